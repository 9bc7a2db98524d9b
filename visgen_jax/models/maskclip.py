"""MaskCLIP: a frozen CLIP ViT with mask class tokens and Relative Mask Attention.

One pass of the image tower classifies M masks. The token sequence is
[M mask tokens | class | N patches]; every mask token starts as a copy of the
class token after ln_pre and goes through the same frozen blocks. Attention
follows Eq. 2.1/2.2 (`visgen_jax.nn.attention.mask_token_attention`): class and
patch tokens attend as in CLIP and never to mask tokens; mask token m attends
to the class token and to the patches its mask touches (logit ≥ 0, i.e.
σ ≥ 0.5, anywhere in the patch: a max-pool of the binarised mask); mask tokens
do not see each other. The class token is always visible, so an empty mask
gives a finite embedding. Each mask's embedding is ln_post + proj of its token.

Relative Mask Attention (RMA), at the 1-based `rma_layers` (6, 12, 18, 24 of a
24-layer ViT in the paper; e.g. 3, 6, 9, 12 for a 12-layer one), with facts
from the public mlpc-ucsd/MaskCLIP code where the paper is terse:
  - mask patch tokens: tanh(mask logits) → conv (kernel = stride = patch,
    1 → width) → LayerNorm, one token per (mask, patch);
  - Eq. 2.3/2.4: on the mask-token × patch block the attention logit becomes
    the mean of CLIP's q·k/√d and the mask term q'·k'/√d (per head), where q'
    are the mask patch tokens and k' = Linear(ln_1(x)) of the patches. It is
    passed to the attention as the additive bias (q'·k' − q·k)/(2√d);
  - Eq. 2.5: the interaction (q_m/√d) ⊙ k_n of each mask token with each patch
    (all heads, [B, M, N, width]) → QuickGELU (the public code's "gelu") →
    1×1 conv width → patch² → pixel shuffle to the mask's resolution → added
    to the mask logits. Later layers binarise the refined logits.
Inits as the public code: kaiming-normal conv / linear weights, U(0, 1) conv
biases, zero k' bias.

Params: {'clip': the exact `VisionTransformer` params (converter output drops
in), 'rma': {'layers_j': params of RMA at rma_layers[j]}}. Only 'rma' trains.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.models.clip import CLIP_MEAN, VisionTransformer, layer_norm, quick_gelu
from visgen_jax.nn.attention import mask_token_attention

# PyTorch's kaiming_normal_ (fan_in, gain √2, untruncated).
_kaiming_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
CROP_FILLS = ('mean', 'zero')


def patch_visibility(mask_logits, patch_size: int):
  """[B, M, H, W] logits → [B, M, N] bool: does the mask (logit ≥ 0) touch patch n (row-major)."""
  b, m, h, w = mask_logits.shape
  grid = (h // patch_size, w // patch_size)
  inside = (mask_logits >= 0).reshape(b, m, grid[0], patch_size, grid[1], patch_size)
  return inside.any(axis=(3, 5)).reshape(b, m, grid[0] * grid[1])


class RMALayer(nn.Module):
  """The parameters RMA adds to one CLIP block, and the two computations using them."""
  width: int
  heads: int
  patch_size: int
  dtype: Any = jnp.float32

  def setup(self):
    p = self.patch_size
    self.patchify = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                            param_dtype=jnp.float32, kernel_init=_kaiming_normal,
                            bias_init=nn.initializers.uniform(1.0))
    self.query_norm = layer_norm(self.dtype)
    self.key_proj = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                             kernel_init=_kaiming_normal, bias_init=nn.initializers.zeros)
    self.refine = nn.Dense(p * p, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=_kaiming_normal, bias_init=nn.initializers.uniform(1.0))

  def logit_bias(self, h, q, k, mask_logits):
    """[B, heads, M, N] bias turning the mask-token × patch logits into Eq. 2.4's mean.

    h: ln_1 of the block input [B, T, width]; q, k: [B, T, heads, D]; mask_logits
    [B, M, H, W] (the ones this block's attention mask was made from).
    """
    b, m, height, width = mask_logits.shape
    d = q.shape[-1]
    tokens = self.patchify(jnp.tanh(mask_logits).reshape(b * m, height, width, 1).astype(self.dtype))
    q_mask = self.query_norm(tokens).reshape(b, m, -1, self.heads, d)
    k_mask = self.key_proj(h[:, m + 1:]).reshape(b, -1, self.heads, d)
    extra = jnp.einsum('bmnhd,bnhd->bhmn', q_mask, k_mask)
    clip = jnp.einsum('bmhd,bnhd->bhmn', q[:, :m], k[:, m + 1:])
    return ((extra - clip) / (2 * math.sqrt(d))).astype(jnp.float32)

  def mask_residual(self, q, k, num_masks: int, grid: tuple[int, int]):
    """Eq. 2.5: [B, M, H, W] logit residual from the mask-token × patch interaction."""
    b, _, heads, d = q.shape
    m, p = num_masks, self.patch_size
    interaction = (q[:, :m, None] / math.sqrt(d)) * k[:, None, m + 1:]
    interaction = quick_gelu(interaction.reshape(b, m, grid[0] * grid[1], heads * d))
    out = self.refine(interaction).reshape(b, m, grid[0], grid[1], p, p)
    # Pixel shuffle: channel i·p + j is pixel (i, j) of its patch.
    return out.transpose(0, 1, 2, 4, 3, 5).reshape(b, m, grid[0] * p, grid[1] * p)


class RelativeMaskAttention(nn.Module):
  """One `RMALayer` per RMA layer ('layers_j' for the j-th of MaskCLIP.rma_layers)."""
  count: int
  width: int
  heads: int
  patch_size: int
  dtype: Any = jnp.float32

  def setup(self):
    self.layers = [RMALayer(self.width, self.heads, self.patch_size, self.dtype)
                   for _ in range(self.count)]


class MaskCLIP(nn.Module):
  """CLIP's vision tower with M mask class tokens and (optionally) RMA.

  Attributes:
    clip: the `VisionTransformer` (its `attention_impl` picks 'xla' or 'pallas'
      for the masked attention too).
    rma_layers: 1-based indices of the blocks that get RMA, increasing.
    use_rma: False gives the training-free "mask tokens without RMA" baseline
      (no added params).
  """
  clip: VisionTransformer
  rma_layers: tuple[int, ...] = (6, 12, 18, 24)
  use_rma: bool = True

  def setup(self):
    if self.use_rma:
      check_rma_layers(self.rma_layers, self.clip.layers)
      self.rma = RelativeMaskAttention(len(self.rma_layers), self.clip.width, self.clip.heads,
                                       self.clip.patch_size, self.clip.dtype)

  def __call__(self, images, mask_logits):
    """Mask embeddings and RMA's refined masks.

    Args:
      images: [B, H, W, 3] in [-1, 1]; H, W multiples of the patch size.
      mask_logits: [B, M, H, W] mask logits at the image's resolution (a mask is
        logit ≥ 0; pass e.g. ±10 for binary proposals: RMA reads tanh of them).

    Returns:
      (embeddings [B, M, embed_dim] — unnormalised, like CLIP's image
      embedding —, refined: a tuple with the [B, M, H, W] float32 mask logits
      after each RMA layer, in order; empty without RMA).
    """
    clip = self.clip
    grid = clip.grid(images.shape)
    if (mask_logits.ndim != 4 or mask_logits.shape[0] != images.shape[0]
        or mask_logits.shape[2:] != images.shape[1:3]):
      raise ValueError(f'MaskCLIP mask logits must be [B, M, H, W] = [{images.shape[0]}, M, '
                       f'{images.shape[1]}, {images.shape[2]}] for images {tuple(images.shape)}; '
                       f'got {tuple(mask_logits.shape)}.')
    b, m = mask_logits.shape[:2]
    x = clip.tokens(images)
    x = jnp.concatenate([jnp.broadcast_to(x[:, :1], (b, m, clip.width)), x], axis=1)
    logits = mask_logits.astype(jnp.float32)
    visible = patch_visibility(logits, clip.patch_size)
    attention = functools.partial(mask_token_attention, impl=clip.attention_impl)
    rma_index = {layer - 1: j for j, layer in enumerate(self.rma_layers)} if self.use_rma else {}
    refined = []
    for i, block in enumerate(clip.resblocks):
      if i not in rma_index:
        x = block(x, functools.partial(attention, patch_mask=visible))
        continue
      rma = self.rma.layers[rma_index[i]]
      h, q, k, v = block.attention_inputs(x)
      bias = rma.logit_bias(h, q, k, logits)
      x = block.residual(x, attention(q, k, v, visible, bias))
      logits = logits + rma.mask_residual(q, k, m, grid).astype(jnp.float32)
      refined.append(logits)
      visible = patch_visibility(logits, clip.patch_size)
    return clip.head(x[:, :m]), tuple(refined)


def check_rma_layers(rma_layers, depth: int):
  """ValueError unless `rma_layers` are increasing 1-based indices of a tower's `depth` blocks."""
  layers = tuple(rma_layers)
  if any(not 1 <= i <= depth for i in layers) or list(layers) != sorted(set(layers)):
    raise ValueError(f'rma_layers={layers} must be increasing 1-based block indices within 1..{depth} '
                     f'(the CLIP tower has {depth} blocks).')


def class_embeddings(clip_model, clip_params, tokenize, vocabulary, templates) -> np.ndarray:
  """[len(vocabulary), embed_dim] unit vectors: each name's CLIP text embeddings
  of `templates` (each with one {} for the name) normalised, averaged and
  normalised again; `tokenize` maps a list of prompts to token ids [P, L]."""
  prompts = [t.format(name) for name in vocabulary for t in templates]
  encode = jax.jit(lambda p, ids: clip_model.apply({'params': p}, ids, method='encode_text'))
  features = np.asarray(encode(clip_params, tokenize(prompts)), np.float64)
  features /= np.linalg.norm(features, axis=-1, keepdims=True)
  features = features.reshape(len(vocabulary), len(templates), -1).mean(axis=1)
  return (features / np.linalg.norm(features, axis=-1, keepdims=True)).astype(np.float32)


def class_logits(embeddings, text, temperature):
  """cos(mask embedding, class embedding) / temperature: [B, M, E] x [C+1, E] → [B, M, C+1]."""
  embeddings = embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
  return jnp.einsum('bme,ce->bmc', embeddings, text) / temperature


def clip_crop_features(clip: VisionTransformer, clip_params, images, mask_logits, *,
                       fill: str = 'mean'):
  """The "CLIP crop" baseline: one CLIP pass per mask on its masked, cropped image.

  For each mask (logit ≥ 0): pixels outside the mask are replaced by `fill`
  ('mean': CLIP's mean colour, which normalises to 0; 'zero': black), the
  mask's bounding box is cropped and stretched to the tower's trained
  `image_size`² with antialiased bilinear resampling
  (`jax.image.scale_and_translate`), and the class-token embedding of that
  crop is returned. An empty mask uses the whole (all-fill) image.

  Args:
    clip: the `VisionTransformer`; clip_params: its params.
    images: [B, H, W, 3] in [-1, 1].
    mask_logits: [B, M, H, W].

  Returns:
    [B, M, embed_dim], unnormalised (as `MaskCLIP`'s embeddings).
  """
  if fill not in CROP_FILLS:
    raise ValueError(f'clip_crop_features fill={fill!r} is unknown; allowed: {", ".join(CROP_FILLS)}.')
  if (images.ndim != 4 or mask_logits.ndim != 4 or mask_logits.shape[0] != images.shape[0]
      or mask_logits.shape[2:] != images.shape[1:3]):
    raise ValueError(f'clip_crop_features needs images [B, H, W, 3] and mask logits [B, M, H, W] '
                     f'of the same B, H, W; got {tuple(images.shape)} and {tuple(mask_logits.shape)}.')
  b, m, h, w = mask_logits.shape
  size = clip.image_size
  value = 2 * jnp.asarray(CLIP_MEAN) - 1 if fill == 'mean' else -jnp.ones(3)

  def extent(inside, length):
    """[start, stop) of the True entries of a 1-D bool array; the whole axis if none."""
    any_inside = inside.any()
    start = jnp.where(any_inside, jnp.argmax(inside), 0)
    stop = jnp.where(any_inside, length - jnp.argmax(inside[::-1]), length)
    return start, stop

  def crop(image, mask):
    inside = mask >= 0
    y0, y1 = extent(inside.any(axis=1), h)
    x0, x1 = extent(inside.any(axis=0), w)
    scale = jnp.stack([size / (y1 - y0), size / (x1 - x0)]).astype(jnp.float32)
    translation = -jnp.stack([y0, x0]).astype(jnp.float32) * scale
    masked = jnp.where(inside[..., None], image.astype(jnp.float32), value)
    return jax.image.scale_and_translate(masked, (size, size, 3), (0, 1), scale, translation,
                                         method='linear', antialias=True)

  crops = jax.vmap(lambda image, masks: jax.vmap(lambda mask: crop(image, mask))(masks))(
      images, mask_logits)
  features = clip.apply({'params': clip_params}, crops.reshape(b * m, size, size, 3))
  return features.reshape(b, m, -1)
