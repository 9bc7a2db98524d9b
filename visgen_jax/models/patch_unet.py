"""Patch-DM's patch UNet with feature collage (Ding et al., "Patched Denoising
Diffusion Models for High-Resolution Image Synthesis", ICLR 2024), NHWC.

The layers are the ADM UNet's (`adm_layout`, `ResBlock`, `AttentionBlock`)
built for one patch. Conditioning, as the public Patch-DM code does it:
  emb  = [MLP(sinusoid(t)) | MLP(sinusoid(i) ‖ sinusoid(j))], each half of
         `embed_dim`, drives every ResBlock's scale-shift;
  code = the image's global semantic code; each ResBlock scales its features
         by (1 + Linear(SiLU(code))) (`ResBlock(code_shift=False)`).
A patch whose position is masked out gets the embedding of a zero sinusoid
(classifier-free position dropout, and patches beyond the trained grid).

Feature collage: the encoder and middle block run on every patch of a grid
independently; the decoder runs on the (P1-1)×(P2-1) patches shifted by half
a patch, whose features are collaged (`visgen_jax.kernels.collage`) from the
bottleneck once and from every skip connection as it is consumed, each at its
own level. The decoder's positions are the midpoints of the four neighbours.
`PatchUNet.encode` / `PatchUNet.decode` are the two halves (apply with
`method=`), which `streaming_denoiser` runs band by band. Training takes 2×2
windows of patches (`crop_windows`, `window_losses`).
"""

import types
from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.kernels import collage_pallas
from visgen_jax.models.adm_unet import adm_layout
from visgen_jax.nn.layers import (
    AttentionBlock, Downsample, GroupNorm32, ResBlock, Upsample, conv2d, dense, timestep_embedding)

DECODE = ('collage', 'plain', 'both')

# `train` (argument 4, counting self) selects Python control flow: keep it static.
_RematResBlock = nn.remat(ResBlock, static_argnums=(4,))


def to_patches(images, patch: int):
  """[B, H, W, C] → [B, H/p, W/p, p, p, C]."""
  return einops.rearrange(images, 'b (p1 h) (p2 w) c -> b p1 p2 h w c', h=patch, w=patch)


def from_patches(patches):
  """[B, P1, P2, p, p, C] → [B, P1·p, P2·p, C]."""
  return einops.rearrange(patches, 'b p1 p2 h w c -> b (p1 h) (p2 w) c')


def midpoints(pos, pos_mask):
  """Decoder positions and mask of the collaged grid: the four neighbours' mean
  position, kept only where all four are kept."""
  mid = (pos[:, :-1, :-1] + pos[:, 1:, :-1] + pos[:, :-1, 1:] + pos[:, 1:, 1:]) / 4
  keep = jnp.minimum(jnp.minimum(pos_mask[:, :-1, :-1], pos_mask[:, 1:, :-1]),
                     jnp.minimum(pos_mask[:, :-1, 1:], pos_mask[:, 1:, 1:]))
  return mid, keep


class PatchUNet(nn.Module):
  """x [B, P1, P2, p, p, in_channels] (a grid of patches), t [B], pos
  [B, P1, P2, 2] (patch coordinates, float), code [B, code_dim], pos_mask
  [B, P1, P2] (1 = use the position; None = all) →
    decode='collage': [B, P1-1, P2-1, p, p, out_channels], the shifted patches;
    decode='plain':   [B, P1, P2, p, p, out_channels], every patch on its own;
    decode='both':    (collage, plain) from one encoder pass (training).

  Defaults are the paper's: 64×64 patches, 64 channels × (1, 2, 4, 8), two
  ResBlocks per level, attention at 16×16 with one head, dropout 0.1, a
  512-d embedding, resampling ResBlocks, a 512-d code.
  """
  patch_size: int = 64
  in_channels: int = 3
  model_channels: int = 64
  out_channels: int = 3
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  channel_mult: Sequence[int] = (1, 2, 4, 8)
  num_heads: int = 1
  num_head_channels: int = -1
  resblock_updown: bool = True
  embed_dim: int = 512
  pos_channels: int = 64  # sinusoid width per axis
  code_dim: int = 512
  dtype: Any = jnp.float32
  remat: bool = False
  attn_impl: str = 'xla'
  collage_impl: str = 'xla'  # 'pallas': the fused-gather kernel (collage_pallas)

  def layout(self):
    """The ADM blocks of one patch; ValueError if the fields do not make a patch UNet."""
    levels = len(self.channel_mult)
    lowest = self.patch_size // 2 ** (levels - 1)
    if self.patch_size % 2 ** (levels - 1) or lowest % 2:
      raise ValueError(f'patch_size={self.patch_size} with {levels} levels gives {self.patch_size}/'
                       f'{2 ** (levels - 1)}-pixel features that cannot shift by half a patch; use a '
                       'patch size divisible by 2**levels.')
    return adm_layout(types.SimpleNamespace(
        image_size=self.patch_size, model_channels=self.model_channels, channel_mult=self.channel_mult,
        attention_resolutions=self.attention_resolutions, num_res_blocks=self.num_res_blocks,
        num_heads=self.num_heads, num_heads_upsample=-1, resblock_updown=self.resblock_updown))

  def setup(self):
    self.spec = self.layout()
    self.collage = collage_pallas.select(self.collage_impl)
    half = self.embed_dim // 2
    self.time_mlp = (dense(half, name='time_embed_0'), dense(half, name='time_embed_1'))
    self.pos_mlp = (dense(half, name='pos_embed_0'), dense(half, name='pos_embed_1'))
    res_cls = _RematResBlock if self.remat else ResBlock
    modules = {}
    layout = self.spec
    for spec in [s for block in layout.input_blocks + layout.output_blocks for s in block] + list(layout.middle_block):
      if spec.kind == 'conv_in':
        modules[spec.name] = conv2d(spec.out_channels, 3, dtype=self.dtype, name=spec.name)
      elif spec.kind == 'res':
        modules[spec.name] = res_cls(spec.out_channels, self.dropout, True, up=spec.updown == 'up',
                                     down=spec.updown == 'down', code_shift=False, dtype=self.dtype,
                                     name=spec.name)
      elif spec.kind == 'attn':
        modules[spec.name] = AttentionBlock(spec.num_heads, self.num_head_channels, attn_impl=self.attn_impl,
                                            dtype=self.dtype, name=spec.name)
      elif spec.kind == 'down':
        modules[spec.name] = Downsample(dtype=self.dtype, name=spec.name)
      else:
        modules[spec.name] = Upsample(dtype=self.dtype, name=spec.name)
    self.blocks = modules
    self.out_norm = GroupNorm32(name='out_norm')
    self.out_conv = conv2d(self.out_channels, 3, zero_init=True, name='out_conv')

  def __call__(self, x, t, pos, code, pos_mask=None, *, decode: str = 'collage', train: bool = False):
    b, p1, p2 = x.shape[:3]
    if pos_mask is None:
      pos_mask = jnp.ones((b, p1, p2), jnp.float32)
    self._check_inputs(x, t, pos, code, pos_mask, decode)
    features = self.encode(x, t, pos, code, pos_mask, train=train)
    outs = {}
    if decode in ('collage', 'both'):
      outs['collage'] = self.decode(features, t, pos, code, pos_mask, shift=True, train=train)
    if decode in ('plain', 'both'):
      outs['plain'] = self.decode(features, t, pos, code, pos_mask, shift=False, train=train)
    return (outs['collage'], outs['plain']) if decode == 'both' else outs[decode]

  def _embed(self, t, pos, keep):
    """[B, Q1, Q2, 2] positions → per-patch embeddings [B·Q1·Q2, embed_dim]."""
    q = pos.shape[1] * pos.shape[2]
    flat = pos.reshape(-1, 2).astype(jnp.float32)
    sin = jnp.concatenate([timestep_embedding(flat[:, 0], self.pos_channels),
                           timestep_embedding(flat[:, 1], self.pos_channels)], axis=-1)
    sin = sin * keep.reshape(-1, 1).astype(jnp.float32)
    pos_emb = self.pos_mlp[1](nn.silu(self.pos_mlp[0](sin)))
    time_emb = self.time_mlp[1](nn.silu(self.time_mlp[0](timestep_embedding(t, self.model_channels))))
    return jnp.concatenate([jnp.repeat(time_emb, q, axis=0), pos_emb], axis=-1)

  def _run(self, block, h, emb, codes, train):
    for spec in block:
      if spec.kind == 'res':
        h = self.blocks[spec.name](h, emb, codes, train)
      else:
        h = self.blocks[spec.name](h)
    return h

  def encode(self, x, t, pos, code, pos_mask, *, train: bool = False):
    """Encoder and middle block, every patch on its own: the bottleneck and
    the skip connections, each [B, P1, P2, h, w, C] at its level."""
    b, p1, p2 = x.shape[:3]
    emb = self._embed(t, pos, pos_mask)
    codes = jnp.repeat(jnp.asarray(code, jnp.float32), p1 * p2, axis=0)
    h = x.reshape(b * p1 * p2, *x.shape[3:]).astype(self.dtype)
    skips = []
    for block in self.spec.input_blocks:
      h = self._run(block, h, emb, codes, train)
      skips.append(h)
    h = self._run(self.spec.middle_block, h, emb, codes, train)
    grid = lambda f: f.reshape(b, p1, p2, *f.shape[1:])
    return grid(h), [grid(s) for s in skips]

  def decode(self, features, t, pos, code, pos_mask, *, shift: bool, train: bool = False):
    """Decoder of the encoder's `features` for the grid at `pos` / `pos_mask`:
    shift=True collages every level (→ [B, P1-1, P2-1, p, p, C]), shift=False
    decodes each patch on its own (→ [B, P1, P2, p, p, C])."""
    h, skips = features
    b, p1, p2 = h.shape[:3]
    flat = lambda f: f.reshape(-1, *f.shape[3:])
    h, skips = flat(h), [flat(s) for s in skips]
    if shift:
      pos, pos_mask = midpoints(pos, pos_mask)
      h = self.collage(h, (p1, p2), b)
    q1, q2 = pos.shape[1:3]
    emb = self._embed(t, pos, pos_mask)
    codes = jnp.repeat(jnp.asarray(code, jnp.float32), q1 * q2, axis=0)
    for block in self.spec.output_blocks:
      skip = skips.pop()
      if shift:
        skip = self.collage(skip, (p1, p2), b)
      h = self._run(block, jnp.concatenate([h, skip], axis=-1), emb, codes, train)
    out = self.out_conv(nn.silu(self.out_norm(h.astype(jnp.float32))))
    return out.reshape(b, q1, q2, *out.shape[1:])

  def _check_inputs(self, x, t, pos, code, pos_mask, decode):
    p = self.patch_size
    if decode not in DECODE:
      raise ValueError(f'PatchUNet decode={decode!r}; allowed: {", ".join(DECODE)}.')
    if x.ndim != 6 or x.shape[3:] != (p, p, self.in_channels):
      raise ValueError(f'PatchUNet input has shape {x.shape}; expected a grid of patches '
                       f'[B, P1, P2, {p}, {p}, {self.in_channels}].')
    b, p1, p2 = x.shape[:3]
    if decode != 'plain' and (p1 < 2 or p2 < 2):
      raise ValueError(f'PatchUNet: feature collage needs a grid of at least 2x2 patches, got {p1}x{p2}.')
    if tuple(t.shape) != (b,):
      raise ValueError(f'PatchUNet timesteps t have shape {tuple(t.shape)}; expected ({b},).')
    if tuple(pos.shape) != (b, p1, p2, 2):
      raise ValueError(f'PatchUNet pos has shape {tuple(pos.shape)}; expected ({b}, {p1}, {p2}, 2).')
    if tuple(pos_mask.shape) != (b, p1, p2):
      raise ValueError(f'PatchUNet pos_mask has shape {tuple(pos_mask.shape)}; expected ({b}, {p1}, {p2}).')
    if tuple(code.shape) != (b, self.code_dim):
      raise ValueError(f'PatchUNet code has shape {tuple(code.shape)}; expected ({b}, {self.code_dim}).')


def patch_grid(hw, patch: int):
  """(N1, N2) patches of an (H, W) image; ValueError unless both divide."""
  if len(hw) != 2 or min(hw) <= 0 or hw[0] % patch or hw[1] % patch:
    raise ValueError(f'{"x".join(map(str, hw))} is not an H,W size divisible by the patch size {patch}; '
                     f'use multiples of {patch}.')
  return hw[0] // patch, hw[1] // patch


def crop_windows(arrays, wi, wj, patch: int):
  """The 2×2-patch window starting at patch (wi[b], wj[b]) of every image of each
  of `arrays` [B, H, W, C], and the window's patch positions [B, 2, 2, 2]."""
  crop = jax.vmap(lambda img, i, j: jax.lax.dynamic_slice(
      img, (i * patch, j * patch, 0), (2 * patch, 2 * patch, img.shape[-1])))
  offsets = jnp.arange(2, dtype=jnp.float32)
  pos = jnp.stack(jnp.broadcast_arrays(wi[:, None, None] + offsets[None, :, None],
                                       wj[:, None, None] + offsets[None, None, :]), axis=-1)
  return [crop(a, wi, wj) for a in arrays], pos


def window_losses(shifted, plain, noise, inside):
  """Per-example ε-MSE of one 2×2 window: (collaged centre patch, plain patches
  masked to the unpadded area).

  shifted [B, 1, 1, p, p, C] and plain [B, 2, 2, p, p, C] are the model's
  outputs; noise [B, 2p, 2p, C] and inside [B, 2p, 2p, 1] (1 = image, 0 =
  padding) are the window's. The masked mean is over the whole window.
  """
  patch = shifted.shape[3]
  half = patch // 2
  target = noise[:, half:half + patch, half:half + patch]
  mse_collage = jnp.mean(jnp.square(shifted[:, 0, 0].astype(jnp.float32) - target), axis=(1, 2, 3))
  err = jnp.square(plain.astype(jnp.float32) - to_patches(noise, patch)) * to_patches(inside, patch)
  return mse_collage, jnp.mean(err, axis=(1, 2, 3, 4, 5))


POSITION_MODES = ('interpolate', 'extend')


def grid_positions(grid, train_grid, mode: str = 'interpolate', *, unconditional_positions: bool = True):
  """Encoder positions [N1+1, N2+1, 2] and mask [N1+1, N2+1] (numpy) for an image
  of `grid` patches, padded by half a patch, from a model trained on `train_grid`.

  Training sees the padded grid's patches at integer positions 0 … T.
  'interpolate' spreads the same range over any grid (more patches inside:
  fractional positions). 'extend' keeps the trained grid at its positions in
  the centre and adds patches around it without a position embedding, which
  needs a model trained with position dropout (`unconditional_positions`).
  """
  if mode not in POSITION_MODES:
    raise ValueError(f'position mode {mode!r} is unknown; allowed: {", ".join(POSITION_MODES)}.')
  coords, valid = [], []
  for n, trained in zip(grid, train_grid):
    if mode == 'interpolate':
      c = np.arange(n + 1) * (trained / n)
    else:
      if n < trained:
        raise ValueError(f"'extend': a grid of {tuple(grid)} patches is smaller than the trained "
                         f"{tuple(train_grid)}, so the position embedding cannot place it; use 'interpolate'.")
      c = np.arange(n + 1) - (n - trained) // 2
    coords.append(c.astype(np.float32))
    valid.append((c >= 0) & (c <= trained))
  mask = (valid[0][:, None] & valid[1][None, :]).astype(np.float32)
  if not mask.all() and not unconditional_positions:
    raise ValueError(f"'extend': a grid of {tuple(grid)} patches reaches beyond the trained "
                     f'{tuple(train_grid)}, where patches get no position embedding, but the model was '
                     "trained without position dropout; use 'interpolate'.")
  pos = np.stack(np.meshgrid(coords[0], coords[1], indexing='ij'), axis=-1)
  return pos, mask


def collage_denoiser(unet: PatchUNet, params, pos, pos_mask):
  """denoise_fn(x, t, code, use_pos) on whole images [B, H, W, C] for the samplers.

  Each call pads x by half a patch with zeros (as in training, the padding
  carries no noise), splits it into the (N1+1)×(N2+1) patches at `pos` /
  `pos_mask` (from `grid_positions`), and assembles the N1×N2 collaged
  outputs, which cover exactly the unpadded image. `use_pos` [B] (1/0) drops
  the position embedding of a whole image (classifier-free guidance).
  """
  half = unet.patch_size // 2
  pos = jnp.asarray(pos, jnp.float32)
  pos_mask = jnp.asarray(pos_mask, jnp.float32)

  def denoise(x, t, code, use_pos):
    b = x.shape[0]
    padded = jnp.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
    keep = pos_mask[None] * jnp.asarray(use_pos, jnp.float32).reshape(b, 1, 1)
    out = unet.apply({'params': params}, to_patches(padded, unet.patch_size), t,
                     jnp.broadcast_to(pos, (b, *pos.shape)), code, keep)
    return from_patches(out).astype(jnp.float32)

  return denoise


def check_band_rows(rows: int, band_rows: int) -> int:
  """`rows` (output patch rows) if bands of `band_rows` tile them; else ValueError."""
  if band_rows < 1 or rows % band_rows:
    raise ValueError(f'band_rows={band_rows} must divide the {rows} patch rows of the image; '
                     f'use a divisor of {rows} (1 keeps the least in memory).')
  return rows


def streaming_denoiser(unet: PatchUNet, params, pos, pos_mask, band_rows: int = 1):
  """`collage_denoiser` computed in bands of `band_rows` output patch rows, so
  one step's activations scale with the image width, not its area.

  The encoder treats every patch on its own, so it runs band by band; the
  decoder of output rows [r, r + R) collages encoder rows r … r + R, i.e. it
  needs one row of the previous band. A `lax.scan` over bands carries exactly
  that: the last encoded patch row's features at every level (bottleneck and
  skips). Every patch is encoded once and decoded once, as all at once.
  """
  rows = check_band_rows(pos.shape[0] - 1, band_rows)
  half = unet.patch_size // 2
  pos = jnp.asarray(pos, jnp.float32)
  pos_mask = jnp.asarray(pos_mask, jnp.float32)

  def apply(method, *args, **kwargs):
    return unet.apply({'params': params}, *args, method=method, **kwargs)

  def denoise(x, t, code, use_pos):
    b = x.shape[0]
    padded = jnp.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
    patches = to_patches(padded, unet.patch_size)
    grid_pos = jnp.broadcast_to(pos, (b, *pos.shape))
    keep = pos_mask[None] * jnp.asarray(use_pos, jnp.float32).reshape(b, 1, 1)
    take = lambda a, start, n: jax.lax.dynamic_slice_in_dim(a, start, n, axis=1)

    def encode(start, n):
      return apply(PatchUNet.encode, take(patches, start, n), t, take(grid_pos, start, n), code,
                   take(keep, start, n))

    def band(carry, k):
      start = 1 + k * band_rows
      new = encode(start, band_rows)
      features = jax.tree.map(lambda old, f: jnp.concatenate([old, f], axis=1), carry, new)
      out = apply(PatchUNet.decode, features, t, take(grid_pos, start - 1, band_rows + 1), code,
                  take(keep, start - 1, band_rows + 1), shift=True)
      return jax.tree.map(lambda f: f[:, -1:], new), out

    _, outs = jax.lax.scan(band, encode(0, 1), jnp.arange(rows // band_rows))
    outs = jnp.moveaxis(outs, 0, 1).reshape(b, rows, *outs.shape[3:])
    return from_patches(outs).astype(jnp.float32)

  return denoise
