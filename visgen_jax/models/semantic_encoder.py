"""The semantic encoder of Patch-DM's 256² models (Diff-AE's half UNet), NHWC.

The public Patch-DM code builds Diff-AE's `BeatGANsEncoderModel` for its
`semantic_enc` configs: the ADM UNet's encoder half with no time input on the
whole training image — conv_in, the input blocks (ResBlocks, attention at the
listed resolutions, resampling ResBlocks), the middle block (res, attn, res) —
then GroupNorm → SiLU → global average → 1×1 conv to the code (pool
'adaptivenonzero'). Its defaults there: 64 channels × (1, 2, 4, 8, 8), two
ResBlocks per level, attention at 16×16, one head, dropout 0.1, a 512-d code.

The whole image is resized (bilinear) to `size` first: the public code's
encoder sees 256² images at every resolution it trains.

The blocks are the project's ADM ones (`adm_layout`, `ResBlock`,
`AttentionBlock`). `ResBlock` always projects an embedding; fed zeros, that
projection is a learned per-channel bias right after `in_conv`'s own bias, so
each block computes what Diff-AE's time-free ResBlock computes.
"""

import types
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from visgen_jax.models.adm_unet import adm_layout
from visgen_jax.nn.layers import AttentionBlock, Downsample, GroupNorm32, ResBlock, conv2d, dense


class SemanticEncoder(nn.Module):
  """images [B, H, W, C] in [-1, 1] → codes [B, code_dim] (float32).

  The images are resized to `size` (H, W), which must be divisible by
  2^(levels - 1); `attention_resolutions` are feature-map heights in pixels
  there, as in the ADM UNet. Dropout draws from the 'dropout' rng stream when
  `train=True`.
  """
  size: Sequence[int] = (256, 256)
  code_dim: int = 512
  model_channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 4, 8, 8)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_heads: int = 1
  num_head_channels: int = -1
  resblock_updown: bool = True
  dtype: Any = jnp.float32
  attn_impl: str = 'xla'

  def layout(self):
    """The ADM input and middle blocks at `size`; ValueError if the fields do not fit together."""
    hw = tuple(self.size)
    factor = 2 ** (len(self.channel_mult) - 1)
    if len(hw) != 2 or min(hw) <= 0 or hw[0] % factor or hw[1] % factor:
      raise ValueError(f'size={hw} must be H,W divisible by {factor}, which the semantic encoder\'s '
                       f'{len(self.channel_mult)} resolution levels need.')
    heights = [hw[0] // 2**level for level in range(len(self.channel_mult))]
    if not set(self.attention_resolutions) <= set(heights):
      raise ValueError(f'attention_resolutions={tuple(self.attention_resolutions)} must be feature-map '
                       f'heights of the semantic encoder: {", ".join(map(str, heights))} for size={hw}.')
    return adm_layout(types.SimpleNamespace(
        image_size=hw[0], model_channels=self.model_channels, channel_mult=self.channel_mult,
        attention_resolutions=self.attention_resolutions, num_res_blocks=self.num_res_blocks,
        num_heads=self.num_heads, num_heads_upsample=-1, resblock_updown=self.resblock_updown))

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    layout = self.layout()
    b, height, width, c = images.shape
    if (height, width) != tuple(self.size):
      images = jax.image.resize(images, (b, *self.size, c), 'linear')
    no_time = jnp.zeros((b, 1), self.dtype)
    h = images.astype(self.dtype)
    for spec in [s for block in layout.input_blocks for s in block] + list(layout.middle_block):
      if spec.kind == 'conv_in':
        h = conv2d(spec.out_channels, 3, dtype=self.dtype, name=spec.name)(h)
      elif spec.kind == 'res':
        h = ResBlock(spec.out_channels, self.dropout, up=spec.updown == 'up', down=spec.updown == 'down',
                     dtype=self.dtype, name=spec.name)(h, no_time, train=train)
      elif spec.kind == 'attn':
        h = AttentionBlock(spec.num_heads, self.num_head_channels, attn_impl=self.attn_impl,
                           dtype=self.dtype, name=spec.name)(h)
      else:
        h = Downsample(dtype=self.dtype, name=spec.name)(h)
    h = nn.silu(GroupNorm32(name='out_norm')(h.astype(jnp.float32)))
    return dense(self.code_dim, name='out_proj')(h.mean(axis=(1, 2)))
