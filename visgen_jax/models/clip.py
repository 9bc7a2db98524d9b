"""CLIP's ViT image tower and causal text tower (OpenAI CLIP / open_clip) in Flax linen.

The order of operations follows OpenAI's and open_clip's `VisionTransformer` /
`TextTransformer` so that converted weights (`visgen_jax.convert.clip`) give the
same embeddings. The activation is a field: OpenAI trained its models with
QuickGELU (x·σ(1.702x)); open_clip builds the exact-erf GELU unless the model
name ends in `-quickgelu`. The presets use open_clip's names and activations, so
OpenAI's released weights need the `-quickgelu` presets.

Modules are built with `setup()` so MaskCLIP can drive the vision tower piece by
piece: `tokens` (patch conv, class token, position embedding, ln_pre), the list
`resblocks` (each exposing `attention_inputs` and `residual`) and `head`
(ln_post, projection).

Params are float32; `dtype` is the compute dtype.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from visgen_jax import image_io
from visgen_jax.nn.attention import IMPLS, dot_product_attention, mask_token_attention

Dtype = Any

# CLIP's normalisation of [0, 1] RGB pixels.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ('gelu', 'quick_gelu')


def _vit(image_size, patch_size, width, layers):
  return dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
              heads=width // 64)


def _text(width, heads, layers):
  return dict(context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers)


_ARCHITECTURES = {
    'ViT-B-16': dict(embed_dim=512, vision=_vit(224, 16, 768, 12), text=_text(512, 8, 12)),
    'ViT-L-14': dict(embed_dim=768, vision=_vit(224, 14, 1024, 24), text=_text(768, 12, 12)),
    'ViT-L-14-336': dict(embed_dim=768, vision=_vit(336, 14, 1024, 24), text=_text(768, 12, 12)),
    # For tests and first runs on a CPU: a 4x4 patch grid, the real tokenizer's vocabulary.
    'tiny': dict(embed_dim=32, vision=dict(image_size=32, patch_size=8, width=64, layers=4, heads=2),
                 text=_text(64, 2, 2)),
}
# Name → {embed_dim, act, vision: {...}, text: {...}}; '-quickgelu' as open_clip names it.
CLIP_PRESETS = {
    name + suffix: dict(arch, act=act)
    for name, arch in _ARCHITECTURES.items()
    for suffix, act in (('', 'gelu'), ('-quickgelu', 'quick_gelu'))
}


def clip_config(preset: str | Mapping) -> dict:
  """A deep copy of a preset (by name) or of a config dict of the same layout."""
  if isinstance(preset, str):
    if preset not in CLIP_PRESETS:
      raise ValueError(f'CLIP preset {preset!r} is unknown; allowed: {", ".join(CLIP_PRESETS)}.')
    preset = CLIP_PRESETS[preset]
  missing = {'embed_dim', 'act', 'vision', 'text'} - set(preset)
  if missing:
    raise ValueError(f'a CLIP config needs the keys embed_dim, act, vision, text; '
                     f'{", ".join(sorted(missing))} missing.')
  return dict(preset, vision=dict(preset['vision']), text=dict(preset['text']))


def vision_tower(preset: str | Mapping, **overrides) -> 'VisionTransformer':
  """The image tower of a preset; `overrides` set module fields (attention_impl, dtype, ...)."""
  config = clip_config(preset)
  fields = dict(config['vision'], embed_dim=config['embed_dim'], act=config['act'])
  return VisionTransformer(**(fields | overrides))


def text_tower(preset: str | Mapping, **overrides) -> 'TextTransformer':
  """The text tower of a preset; `overrides` set module fields."""
  config = clip_config(preset)
  fields = dict(config['text'], embed_dim=config['embed_dim'], act=config['act'])
  return TextTransformer(**(fields | overrides))


def clip_model(preset: str | Mapping, *, attention_impl: str = 'xla',
               dtype: Dtype = jnp.float32) -> 'CLIP':
  """Both towers of a preset (params {'visual', 'text', 'logit_scale'})."""
  return CLIP(visual=vision_tower(preset, attention_impl=attention_impl, dtype=dtype),
              text=text_tower(preset, dtype=dtype))


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f'CLIP act={name!r} is unknown; allowed: {", ".join(ACTIVATIONS)}.')
  return quick_gelu if name == 'quick_gelu' else gelu


def gelu(x):
  """Exact (erf) GELU, x·Φ(x).

  Written with erf as PyTorch computes it: `jax.nn.gelu(approximate=False)` uses
  erfc, which XLA's CPU backend evaluates ~4× slower than erf (bench maskclip).
  """
  return 0.5 * x * (1 + jax.lax.erf(x * np.float32(math.sqrt(0.5))))


def layer_norm(dtype, name=None):
  # PyTorch's LayerNorm (eps 1e-5) up to float32 rounding. The variance takes one pass,
  # E[x²] − E[x]²: 1.2–1.5x faster than two passes on one CPU core (ViT-B/16 tokens, batch 4).
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=True, dtype=dtype, name=name)


def _check_heads(module, width, heads):
  if heads < 1 or width % heads:
    raise ValueError(f'{type(module).__name__}: width={width} is not divisible by heads={heads}.')


class ResidualAttentionBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

  `in_proj` is PyTorch's fused in-projection (channels [q | k | v], heads
  contiguous within each); the MLP is c_fc → act → c_proj with 4× width.
  """
  width: int
  heads: int
  act: str = 'gelu'
  dtype: Dtype = jnp.float32

  def setup(self):
    _check_heads(self, self.width, self.heads)
    dense = lambda features: nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32)
    self.ln_1 = layer_norm(self.dtype)
    self.in_proj = dense(3 * self.width)
    self.out_proj = dense(self.width)
    self.ln_2 = layer_norm(self.dtype)
    self.c_fc = dense(4 * self.width)
    self.c_proj = dense(self.width)
    self.activation = _activation(self.act)

  def attention_inputs(self, x):
    """(h = ln_1(x), q, k, v), the latter [B, T, heads, width // heads]."""
    h = self.ln_1(x)
    qkv = self.in_proj(h).reshape(*x.shape[:2], 3, self.heads, self.width // self.heads)
    return h, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def residual(self, x, attended):
    """x + out_proj(attended [B, T, heads, D]), then the MLP residual."""
    x = x + self.out_proj(attended.reshape(x.shape))
    return x + self.c_proj(self.activation(self.c_fc(self.ln_2(x))))

  def __call__(self, x, attend: Callable):
    """One block; `attend(q, k, v)` → [B, T, heads, D] is the attention pattern."""
    _, q, k, v = self.attention_inputs(x)
    return self.residual(x, attend(q, k, v))


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] float32 weights of PyTorch's 1-D bicubic resize.

  `F.interpolate(mode='bicubic', align_corners=False)` without antialiasing:
  source coordinate (i + 0.5)·in/out − 0.5, Keys' cubic with a = −0.75, taps
  clamped at the border. Equal sizes give the identity exactly.
  """
  a = -0.75
  src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
  left = np.floor(src)
  t = src - left

  def cubic(d):
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

  weights = np.zeros((size_out, size_in))
  for offset in (-1, 0, 1, 2):
    index = np.clip(left + offset, 0, size_in - 1).astype(int)
    np.add.at(weights, (np.arange(size_out), index), cubic(t - offset))
  return weights.astype(np.float32)


def resize_position_embedding(pos_emb, grid: tuple[int, int]):
  """[1 + g·g, C] class + square-grid position embedding → [1 + gh·gw, C] (bicubic).

  Returned unchanged when the grid is the trained one.
  """
  g = math.isqrt(pos_emb.shape[0] - 1)
  if (g, g) == tuple(grid):
    return pos_emb
  patches = pos_emb[1:].reshape(g, g, -1)
  rows, cols = bicubic_matrix(g, grid[0]), bicubic_matrix(g, grid[1])
  patches = jnp.einsum('ih,jw,hwc->ijc', rows, cols, patches, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos_emb[:1], patches.reshape(grid[0] * grid[1], -1)], axis=0)


def _full_attention(q, k, v, impl):
  """Every token sees every token; 'pallas' runs the mask-token kernel with no mask tokens."""
  if impl == 'pallas':
    patch_mask = jnp.zeros((q.shape[0], 0, q.shape[1] - 1), bool)
    return mask_token_attention(q, k, v, patch_mask, impl='pallas')
  # The whole scale on q (1/8 at D = 64, exact), not √scale on both q and k: one product fewer
  # (the attention core 9.7 → 8.1 ms on one CPU core at ViT-B/16, batch 4; bench maskclip).
  return dot_product_attention(q * (q.shape[-1]**-0.5), k, v, impl=impl, scale=1.0)


class VisionTransformer(nn.Module):
  """CLIP's ViT image tower: NHWC images in [-1, 1] → [B, embed_dim].

  Images are normalised with CLIP's mean/std internally. Any size divisible by
  `patch_size` is accepted; the position embedding is resized bicubically (as
  PyTorch's `F.interpolate`) when the patch grid differs from the trained
  `image_size // patch_size` square, and used as is at the trained size.
  `attention_impl` 'pallas' runs the mask-token kernel (with no mask tokens).
  """
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  embed_dim: int = 512
  act: str = 'gelu'
  attention_impl: str = 'xla'
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.attention_impl not in IMPLS:
      raise ValueError(f'VisionTransformer attention_impl={self.attention_impl!r} is unknown; '
                       f'allowed: {", ".join(IMPLS)}.')
    if self.image_size % self.patch_size:
      raise ValueError(f'VisionTransformer image_size={self.image_size} is not divisible by '
                       f'patch_size={self.patch_size}.')
    _check_heads(self, self.width, self.heads)
    scale = self.width**-0.5
    grid = self.image_size // self.patch_size
    self.conv1 = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                         padding='VALID', use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
    self.class_embedding = self.param('class_embedding', nn.initializers.normal(scale),
                                      (self.width,))
    self.positional_embedding = self.param('positional_embedding', nn.initializers.normal(scale),
                                           (grid * grid + 1, self.width))
    self.ln_pre = layer_norm(self.dtype)
    self.resblocks = [ResidualAttentionBlock(self.width, self.heads, self.act, self.dtype)
                      for _ in range(self.layers)]
    self.ln_post = layer_norm(self.dtype)
    self.proj = self.param('proj', nn.initializers.normal(scale), (self.width, self.embed_dim))

  def grid(self, shape) -> tuple[int, int]:
    """The patch grid (rows, cols) of images of `shape` [B, H, W, 3]; ValueError if unusable."""
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(f'CLIP images must be [B, H, W, 3] RGB in [-1, 1]; got shape {tuple(shape)}.')
    h, w = shape[1:3]
    if h % self.patch_size or w % self.patch_size or not h or not w:
      raise ValueError(f'CLIP image size {h}x{w} is not a positive multiple of the patch size '
                       f'{self.patch_size}; resize or pad it.')
    return h // self.patch_size, w // self.patch_size

  def tokens(self, images):
    """[B, H, W, 3] in [-1, 1] → [B, 1 + N, width]: patches, class token, positions, ln_pre."""
    gh, gw = self.grid(images.shape)
    mean, std = jnp.asarray(CLIP_MEAN), jnp.asarray(CLIP_STD)
    x = ((images.astype(jnp.float32) + 1) / 2 - mean) / std
    x = self.conv1(x.astype(self.dtype)).reshape(images.shape[0], gh * gw, self.width)
    cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + resize_position_embedding(self.positional_embedding, (gh, gw)).astype(x.dtype)
    return self.ln_pre(x)

  def attend(self, q, k, v):
    """The tower's own (unmasked) attention over [class | patches]."""
    return _full_attention(q, k, v, self.attention_impl)

  def head(self, x):
    """[..., width] tokens → [..., embed_dim]: ln_post, then the projection."""
    return self.ln_post(x) @ self.proj.astype(self.dtype)

  def __call__(self, images):
    """[B, H, W, 3] in [-1, 1] → [B, embed_dim] (the class token's embedding)."""
    x = self.tokens(images)
    for block in self.resblocks:
      x = block(x, self.attend)
    return self.head(x[:, 0])


class TextTransformer(nn.Module):
  """CLIP's causal text tower: token ids [B, L ≤ context_length] → [B, embed_dim].

  Token embedding plus the first L positions, causal blocks, ln_final, and the
  features at each sequence's end-of-text token (its largest id, as CLIP's BPE
  puts EOT last in the vocabulary) projected by `text_projection`. Attention is
  always XLA (no causal Pallas kernel exists).
  """
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  embed_dim: int = 512
  act: str = 'gelu'
  dtype: Dtype = jnp.float32

  def setup(self):
    _check_heads(self, self.width, self.heads)
    self.token_embedding = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                                    param_dtype=jnp.float32,
                                    embedding_init=nn.initializers.normal(0.02))
    self.positional_embedding = self.param('positional_embedding', nn.initializers.normal(0.01),
                                           (self.context_length, self.width))
    self.resblocks = [ResidualAttentionBlock(self.width, self.heads, self.act, self.dtype)
                      for _ in range(self.layers)]
    self.ln_final = layer_norm(self.dtype)
    self.text_projection = self.param('text_projection', nn.initializers.normal(self.width**-0.5),
                                      (self.width, self.embed_dim))

  def __call__(self, text):
    if text.ndim != 2 or not 0 < text.shape[1] <= self.context_length:
      raise ValueError(f'CLIP text must be token ids [B, L] with 1 <= L <= {self.context_length}; '
                       f'got shape {tuple(text.shape)}.')
    length = text.shape[1]
    x = self.token_embedding(text) + self.positional_embedding[:length].astype(self.dtype)
    causal = jnp.tril(jnp.ones((length, length), bool))
    attend = lambda q, k, v: dot_product_attention(q, k, v, mask=causal)
    for block in self.resblocks:
      x = block(x, attend)
    x = self.ln_final(x)
    pooled = jnp.take_along_axis(x, jnp.argmax(text, axis=-1)[:, None, None], axis=1)[:, 0]
    return pooled @ self.text_projection.astype(self.dtype)


class CLIP(nn.Module):
  """Both towers and the contrastive temperature (params 'visual', 'text', 'logit_scale')."""
  visual: VisionTransformer
  text: TextTransformer

  def setup(self):
    if self.visual.embed_dim != self.text.embed_dim:
      raise ValueError(f'CLIP towers disagree on embed_dim: image {self.visual.embed_dim}, '
                       f'text {self.text.embed_dim}.')
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(math.log(1 / 0.07)), ())

  def encode_image(self, images):
    return self.visual(images)

  def encode_text(self, text):
    return self.text(text)

  def __call__(self, images, text):
    """(L2-normalised image features [B, E], text features [B', E], exp(logit_scale))."""
    normalise = lambda f: f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    return (normalise(self.encode_image(images)), normalise(self.encode_text(text)),
            jnp.exp(self.logit_scale))


def preprocess(images, size: int) -> np.ndarray:
  """CLIP's evaluation transform of [B, H, W, 3] images in [-1, 1]: the shorter
  side resized to `size` (PIL bicubic, the longer side truncated as
  torchvision's Resize), then the centre size×size crop; [-1, 1] float32 (the
  tower normalises with CLIP's mean and std itself)."""
  out = []
  for image in np.asarray(images, np.float32):
    im = Image.fromarray(image_io.to_uint8(image))
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((size, int(h * scale)) if w <= h else (int(w * scale), size), Image.BICUBIC)
    w, h = im.size
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    out.append(image_io.to_float(im.crop((left, top, left + size, top + size))))
  return np.stack(out)


def embed_indexed_images(tower: 'VisionTransformer', params, batches, table: np.ndarray,
                         batch_size: int) -> np.ndarray:
  """`table` with row i set to the image embedding (projected, not normalised)
  of the image of index i, for every image of `batches` ({'image' [n, H, W, 3]
  in [-1, 1], 'index' [n]}, n <= batch_size), after `preprocess`. Batches are
  padded to batch_size, so the tower compiles once."""
  embed = jax.jit(lambda p, x: tower.apply({'params': p}, x))
  for batch in batches:
    n = len(batch['index'])
    x = preprocess(batch['image'], tower.image_size)
    x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    table[batch['index']] = np.asarray(embed(params, x))[:n]
  return table
