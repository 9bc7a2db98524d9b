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
"""

import types
from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from visgen_jax.errors import UserError
from visgen_jax.kernels.collage import collage
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

  def layout(self):
    return adm_layout(types.SimpleNamespace(
        image_size=self.patch_size, model_channels=self.model_channels, channel_mult=self.channel_mult,
        attention_resolutions=self.attention_resolutions, num_res_blocks=self.num_res_blocks,
        num_heads=self.num_heads, num_heads_upsample=-1, resblock_updown=self.resblock_updown))

  @nn.compact
  def __call__(self, x, t, pos, code, pos_mask=None, *, decode: str = 'collage', train: bool = False):
    b, p1, p2 = x.shape[:3]
    if pos_mask is None:
      pos_mask = jnp.ones((b, p1, p2), jnp.float32)
    self._check_inputs(x, t, pos, code, pos_mask, decode)
    layout = self.layout()
    half = self.embed_dim // 2
    time_mlp = (dense(half, name='time_embed_0'), dense(half, name='time_embed_1'))
    pos_mlp = (dense(half, name='pos_embed_0'), dense(half, name='pos_embed_1'))

    def embed(pos, keep):
      """[B, Q1, Q2, 2] positions → per-patch embeddings [B·Q1·Q2, embed_dim]."""
      q = pos.shape[1] * pos.shape[2]
      flat = pos.reshape(-1, 2).astype(jnp.float32)
      sin = jnp.concatenate([timestep_embedding(flat[:, 0], self.pos_channels),
                             timestep_embedding(flat[:, 1], self.pos_channels)], axis=-1)
      sin = sin * keep.reshape(-1, 1).astype(jnp.float32)
      pos_emb = pos_mlp[1](nn.silu(pos_mlp[0](sin)))
      time_emb = time_mlp[1](nn.silu(time_mlp[0](timestep_embedding(t, self.model_channels))))
      return jnp.concatenate([jnp.repeat(time_emb, q, axis=0), pos_emb], axis=-1)

    code = jnp.asarray(code, jnp.float32)
    res_cls = _RematResBlock if self.remat else ResBlock
    modules = {}
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

    def run(block, h, emb, codes):
      for spec in block:
        if spec.kind == 'res':
          h = modules[spec.name](h, emb, codes, train)
        else:
          h = modules[spec.name](h)
      return h

    # Encoder and middle block: every patch on its own.
    enc_emb = embed(pos, pos_mask)
    enc_code = jnp.repeat(code, p1 * p2, axis=0)
    h = x.reshape(b * p1 * p2, *x.shape[3:]).astype(self.dtype)
    skips = []
    for block in layout.input_blocks:
      h = run(block, h, enc_emb, enc_code)
      skips.append(h)
    h = run(layout.middle_block, h, enc_emb, enc_code)

    out_norm = GroupNorm32(name='out_norm')
    out_conv = conv2d(self.out_channels, 3, zero_init=True, name='out_conv')

    def decoder(h, skips, emb, codes, shift):
      skips = list(skips)
      if shift:
        h = collage(h, (p1, p2), b)
      for block in layout.output_blocks:
        skip = skips.pop()
        if shift:
          skip = collage(skip, (p1, p2), b)
        h = run(block, jnp.concatenate([h, skip], axis=-1), emb, codes)
      return out_conv(nn.silu(out_norm(h.astype(jnp.float32))))

    outs = {}
    if decode in ('collage', 'both'):
      mid_pos, mid_keep = midpoints(pos, pos_mask)
      out = decoder(h, skips, embed(mid_pos, mid_keep), jnp.repeat(code, (p1 - 1) * (p2 - 1), axis=0), True)
      outs['collage'] = out.reshape(b, p1 - 1, p2 - 1, *out.shape[1:])
    if decode in ('plain', 'both'):
      out = decoder(h, skips, enc_emb, enc_code, False)
      outs['plain'] = out.reshape(b, p1, p2, *out.shape[1:])
    return (outs['collage'], outs['plain']) if decode == 'both' else outs[decode]

  def _check_inputs(self, x, t, pos, code, pos_mask, decode):
    p = self.patch_size
    if decode not in DECODE:
      raise UserError(f'PatchUNet decode={decode!r}; allowed: {", ".join(DECODE)}.')
    if x.ndim != 6 or x.shape[3:] != (p, p, self.in_channels):
      raise UserError(f'PatchUNet input has shape {x.shape}; expected a grid of patches '
                      f'[B, P1, P2, {p}, {p}, {self.in_channels}].')
    b, p1, p2 = x.shape[:3]
    if decode != 'plain' and (p1 < 2 or p2 < 2):
      raise UserError(f'PatchUNet: feature collage needs a grid of at least 2x2 patches, got {p1}x{p2}.')
    lowest = p // 2 ** (len(self.channel_mult) - 1)
    if p % 2 ** (len(self.channel_mult) - 1) or lowest % 2:
      raise UserError(f'PatchUNet: patch_size={p} with {len(self.channel_mult)} levels gives {p}/'
                      f'{2 ** (len(self.channel_mult) - 1)}-pixel features that cannot shift by half a '
                      'patch; use a patch size divisible by 2**levels.')
    if tuple(t.shape) != (b,):
      raise UserError(f'PatchUNet timesteps t have shape {tuple(t.shape)}; expected ({b},).')
    if tuple(pos.shape) != (b, p1, p2, 2):
      raise UserError(f'PatchUNet pos has shape {tuple(pos.shape)}; expected ({b}, {p1}, {p2}, 2).')
    if tuple(pos_mask.shape) != (b, p1, p2):
      raise UserError(f'PatchUNet pos_mask has shape {tuple(pos_mask.shape)}; expected ({b}, {p1}, {p2}).')
    if tuple(code.shape) != (b, self.code_dim):
      raise UserError(f'PatchUNet code has shape {tuple(code.shape)}; expected ({b}, {self.code_dim}).')


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
    raise UserError(f'sample.positions={mode!r} is unknown; allowed: {", ".join(POSITION_MODES)}.')
  coords, valid = [], []
  for n, trained in zip(grid, train_grid):
    if mode == 'interpolate':
      c = np.arange(n + 1) * (trained / n)
    else:
      if n < trained:
        raise UserError(f'sample.positions=extend: a grid of {tuple(grid)} patches is smaller than the '
                        f'trained {tuple(train_grid)}, so the position embedding cannot place it; use '
                        'sample.positions=interpolate.')
      c = np.arange(n + 1) - (n - trained) // 2
    coords.append(c.astype(np.float32))
    valid.append((c >= 0) & (c <= trained))
  mask = (valid[0][:, None] & valid[1][None, :]).astype(np.float32)
  if not mask.all() and not unconditional_positions:
    raise UserError(f'sample.size: a grid of {tuple(grid)} patches reaches beyond the trained '
                    f'{tuple(train_grid)}, where patches get no position embedding, but the model was '
                    'trained without position dropout (diffusion.pos_drop=0); use '
                    'sample.positions=interpolate.')
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
