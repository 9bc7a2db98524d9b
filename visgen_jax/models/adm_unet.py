"""OpenAI's ADM UNet (guided_diffusion `UNetModel`) in Flax linen, NHWC.

Same blocks, order and parameter layout as guided_diffusion, so that its
checkpoints convert exactly (`visgen_jax.convert.guided_diffusion`). Always
`conv_resample=True` and 2-D, as every guided_diffusion script builds it.

Layer names mirror guided_diffusion's module list: `input_blocks_0_conv`,
`input_blocks_{i}_{res|attn|down}`, `middle_block_{0|1|2}`,
`output_blocks_{i}_{res|attn|up}`, plus `time_embed_{0|1}`, `label_emb`,
`out_norm`, `out_conv`; `adm_layout` lists them with their PyTorch names.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from visgen_jax.nn.layers import (
    AttentionBlock, Downsample, GroupNorm32, ResBlock, Upsample, conv2d, dense, timestep_embedding)


# `train` (argument 4, counting self) selects Python control flow: keep it static.
_RematResBlock = nn.remat(ResBlock, static_argnums=(4,))


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer of the UNet.

  kind: 'conv_in' | 'res' | 'attn' | 'down' (strided conv) | 'up' (nearest + conv).
  name: the Flax module name; torch: guided_diffusion's module path.
  out_channels: for 'res'; updown: 'up' / 'down' for a resampling ResBlock.
  num_heads: for 'attn' (before `num_head_channels` overrides it).
  """
  kind: str
  name: str
  torch: str
  out_channels: int = 0
  updown: str | None = None
  num_heads: int = 0


@dataclasses.dataclass(frozen=True)
class Layout:
  """Layers grouped like guided_diffusion's TimestepEmbedSequential blocks."""
  input_blocks: tuple[tuple[LayerSpec, ...], ...]
  middle_block: tuple[LayerSpec, ...]
  output_blocks: tuple[tuple[LayerSpec, ...], ...]


def attention_downsample_rates(image_size: int, attention_resolutions: Sequence[int],
                               num_levels: int) -> frozenset[int]:
  """Resolutions in pixels → downsample rates ds (script_util: ds = image_size // res)."""
  rates = {image_size // 2**level: 2**level for level in range(num_levels)}
  for res in attention_resolutions:
    if res not in rates:
      raise ValueError(f'attention_resolutions contains {res}, but a UNet with image_size={image_size} and '
                       f'{num_levels} levels only has feature maps of sizes {sorted(rates, reverse=True)}.')
  return frozenset(rates[res] for res in attention_resolutions)


def adm_layout(cfg: 'ADMUNet') -> Layout:
  """The UNet's layers, in guided_diffusion's order (its `__init__` loops)."""
  mc, mult = cfg.model_channels, tuple(cfg.channel_mult)
  if not mult:
    raise ValueError('ADMUNet.channel_mult is empty; give one multiplier per resolution level, e.g. (1, 2, 4, 8).')
  attn_ds = attention_downsample_rates(cfg.image_size, cfg.attention_resolutions, len(mult))
  heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample

  ch = int(mult[0] * mc)
  inputs = [(LayerSpec('conv_in', 'input_blocks_0_conv', 'input_blocks.0.0', ch),)]
  ds = 1
  for level, m in enumerate(mult):
    for _ in range(cfg.num_res_blocks):
      i, ch = len(inputs), int(m * mc)
      block = [LayerSpec('res', f'input_blocks_{i}_res', f'input_blocks.{i}.0', ch)]
      if ds in attn_ds:
        block.append(LayerSpec('attn', f'input_blocks_{i}_attn', f'input_blocks.{i}.1', ch,
                               num_heads=cfg.num_heads))
      inputs.append(tuple(block))
    if level != len(mult) - 1:
      i = len(inputs)
      if cfg.resblock_updown:
        inputs.append((LayerSpec('res', f'input_blocks_{i}_down', f'input_blocks.{i}.0', ch, updown='down'),))
      else:
        inputs.append((LayerSpec('down', f'input_blocks_{i}_down', f'input_blocks.{i}.0', ch),))
      ds *= 2

  middle = (LayerSpec('res', 'middle_block_0', 'middle_block.0', ch),
            LayerSpec('attn', 'middle_block_1', 'middle_block.1', ch, num_heads=cfg.num_heads),
            LayerSpec('res', 'middle_block_2', 'middle_block.2', ch))

  outputs = []
  for level, m in reversed(list(enumerate(mult))):
    for r in range(cfg.num_res_blocks + 1):
      i, ch = len(outputs), int(m * mc)
      block = [LayerSpec('res', f'output_blocks_{i}_res', f'output_blocks.{i}.0', ch)]
      if ds in attn_ds:
        block.append(LayerSpec('attn', f'output_blocks_{i}_attn', f'output_blocks.{i}.1', ch, num_heads=heads_up))
      if level and r == cfg.num_res_blocks:
        torch_name = f'output_blocks.{i}.{len(block)}'
        if cfg.resblock_updown:
          block.append(LayerSpec('res', f'output_blocks_{i}_up', torch_name, ch, updown='up'))
        else:
          block.append(LayerSpec('up', f'output_blocks_{i}_up', torch_name, ch))
        ds //= 2
      outputs.append(tuple(block))
  return Layout(tuple(inputs), middle, tuple(outputs))


class ADMUNet(nn.Module):
  """guided_diffusion's UNetModel: x [B,H,W,in_channels], t [B] → [B,H,W,out_channels].

  Fields mirror `UNetModel.__init__`, except that `attention_resolutions` are in
  pixels (e.g. (32, 16, 8)), converted to downsample rates as script_util does
  (ds = image_size // res), hence `image_size`. `out_channels` is 6 for
  learn_sigma on RGB. `num_classes` / `code_dim` of None or 0 mean off.

  `code_dim`: an extra global code [B, code_dim] conditions every ResBlock
  through its own SiLU → Linear (`code_proj`, DiffusionRig's `cond_emb_layers`),
  a second scale/shift after the time embedding's (see `ResBlock`).

  `dtype` is the compute dtype of the body (params stay float32). As with
  guided_diffusion's fp16 mode, the time/label embeddings and the output head
  (norm, SiLU, conv) run in float32, and the result is float32.
  `remat` recomputes each ResBlock in the backward pass (jax.checkpoint).
  Dropout draws from the 'dropout' rng stream when `train=True`. `attn_impl`
  is passed to `visgen_jax.nn.attention.dot_product_attention`.
  """
  image_size: int
  in_channels: int
  model_channels: int
  out_channels: int
  num_res_blocks: int
  attention_resolutions: Sequence[int]
  dropout: float = 0.0
  channel_mult: Sequence[float] = (1, 2, 4, 8)
  num_classes: int | None = None
  num_heads: int = 1
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  code_dim: int | None = None
  dtype: Any = jnp.float32
  remat: bool = False
  attn_impl: str = 'xla'

  @nn.compact
  def __call__(self, x, t, y=None, code=None, *, train: bool = False):
    self._check_inputs(x, t, y, code)
    layout = adm_layout(self)
    time_dim = 4 * self.model_channels
    emb = timestep_embedding(t, self.model_channels)
    emb = dense(time_dim, name='time_embed_0')(emb)
    emb = dense(time_dim, name='time_embed_1')(nn.silu(emb))
    if self.num_classes:
      emb = emb + nn.Embed(self.num_classes, time_dim, embedding_init=nn.initializers.normal(1.0),
                           name='label_emb')(y)
    if code is not None:
      code = jnp.asarray(code, jnp.float32)

    res_cls = _RematResBlock if self.remat else ResBlock

    def apply(spec: LayerSpec, h):
      if spec.kind == 'conv_in':
        return conv2d(spec.out_channels, 3, dtype=self.dtype, name=spec.name)(h)
      if spec.kind == 'res':
        block = res_cls(spec.out_channels, self.dropout, self.use_scale_shift_norm, up=spec.updown == 'up',
                        down=spec.updown == 'down', dtype=self.dtype, name=spec.name)
        return block(h, emb, code, train)
      if spec.kind == 'attn':
        return AttentionBlock(spec.num_heads, self.num_head_channels, self.use_new_attention_order,
                              attn_impl=self.attn_impl, dtype=self.dtype, name=spec.name)(h)
      if spec.kind == 'down':
        return Downsample(dtype=self.dtype, name=spec.name)(h)
      return Upsample(dtype=self.dtype, name=spec.name)(h)

    h = x.astype(self.dtype)
    skips = []
    for block in layout.input_blocks:
      for spec in block:
        h = apply(spec, h)
      skips.append(h)
    for spec in layout.middle_block:
      h = apply(spec, h)
    for block in layout.output_blocks:
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      for spec in block:
        h = apply(spec, h)

    h = GroupNorm32(name='out_norm')(h.astype(jnp.float32), silu=True)
    return conv2d(self.out_channels, 3, zero_init=True, name='out_conv')(h)

  def _check_inputs(self, x, t, y, code):
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'ADMUNet input x has shape {x.shape}; expected NHWC [B, H, W, {self.in_channels}].')
    factor = 2 ** (len(self.channel_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f'ADMUNet input size {x.shape[1]}x{x.shape[2]} is not divisible by {factor}, '
                       f'which its {len(self.channel_mult)} resolution levels need.')
    if jnp.shape(t) != x.shape[:1]:
      raise ValueError(f'ADMUNet timesteps t have shape {jnp.shape(t)}; expected one per image, ({x.shape[0]},).')
    if bool(self.num_classes) != (y is not None):
      raise ValueError(f'ADMUNet with num_classes={self.num_classes} was called with y='
                       f'{"None" if y is None else "labels"}; pass class labels y [B] iff num_classes is set.')
    if bool(self.code_dim) != (code is not None):
      raise ValueError(f'ADMUNet with code_dim={self.code_dim} was called with code='
                       f'{"None" if code is None else "a code"}; pass code [B, code_dim] iff code_dim is set.')
    if code is not None and jnp.shape(code) != (x.shape[0], self.code_dim):
      raise ValueError(f'ADMUNet code has shape {jnp.shape(code)}; expected ({x.shape[0]}, {self.code_dim}).')
