"""Building blocks of OpenAI's ADM UNet (guided_diffusion), in NHWC.

The order of operations follows guided_diffusion's `nn.py` / `unet.py` exactly
so that converted PyTorch weights give the same outputs. Parameters are always
float32; `dtype` is the compute dtype. Weight initialisers match PyTorch's
defaults (uniform ±1/sqrt(fan_in) kernels) so training from scratch starts
where guided_diffusion starts; biases start at zero.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from visgen_jax.errors import UserError
from visgen_jax.nn.attention import dot_product_attention

Dtype = Any

# PyTorch's default for Conv/Linear weights: kaiming_uniform(a=sqrt(5)), which is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps t [B].

  Layout [cos(t·f), sin(t·f)] with f_i = max_period^(-i/half), zero-padded to an
  odd `dim`, as guided_diffusion.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def _group_mean(x, num_groups: int):
  """Mean of x [B, ..., C] per image and group of channels, [B, G].

  Each channel is summed over the pixels first, then a group's channels: one reduction over
  the pixels, which XLA CPU runs 2-6x faster than one over pixels and channels together.
  """
  per_channel = x.reshape(x.shape[0], -1, x.shape[-1]).sum(axis=1)
  return per_channel.reshape(x.shape[0], num_groups, -1).sum(axis=-1) / (x.size // x.shape[0] // num_groups)


def _group_stats(x, num_groups: int, epsilon: float):
  """(mean, 1/std) per image and group, [B, G], in one pass over x (E[x²] − E[x]²)."""
  mean = _group_mean(x, num_groups)
  var = _group_mean(jnp.square(x), num_groups) - jnp.square(mean)
  return mean, jax.lax.rsqrt(jnp.maximum(var, 0.0) + epsilon)


def _group_to_channels(group_values, channels: int):
  """[B, G] → [B, C], each group's value on its channels.

  A product with a 0/1 matrix, which is exact: XLA CPU fuses a repeat into the
  activation-sized loop that consumes it, mapping every element's channel to its group
  there, which made GroupNorm's loops 1.4x slower.
  """
  groups = group_values.shape[-1]
  expand = jnp.repeat(jnp.eye(groups, dtype=group_values.dtype), channels // groups, axis=1)
  return jnp.dot(group_values, expand, precision=jax.lax.Precision.HIGHEST)


def _per_channel(group_values, x):
  """[B, G] → [B, 1, ..., 1, C], each group's value on its channels."""
  per_channel = _group_to_channels(group_values, x.shape[-1])
  return per_channel.reshape(x.shape[:1] + (1,) * (x.ndim - 2) + x.shape[-1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x, scale, shift, num_groups: int, epsilon: float, silu: bool = False):
  """GroupNorm of float32 x [B, ..., C] over its non-batch axes per group of channels, then
  ·scale + shift ([C], or [B, C] per image), then SiLU if `silu`.

  Its own gradient: autodiff of the two-pass formula makes XLA reduce the
  activations six times in the backward pass, this one reduces four times; and it
  saves only x and the statistics (the normalised and affine activations are
  recomputed), which keeps a ResBlock's norm → scale-shift → SiLU from saving
  three activation-sized tensors for the backward pass.
  """
  return _group_norm_forward(x, scale, shift, num_groups, epsilon, silu)[0]


def _per_image(values, x):
  """[C] or [B, C] → broadcastable to x [B, ..., C]."""
  values = values.reshape((-1, x.shape[-1]))
  return values.reshape(values.shape[:1] + (1,) * (x.ndim - 2) + x.shape[-1:])


def _normalized(x, mean, inv_std):
  return (x - _per_channel(mean, x)) * _per_channel(inv_std, x)


def _group_norm_forward(x, scale, shift, num_groups, epsilon, silu):
  mean, inv_std = _group_stats(x, num_groups, epsilon)
  out = _normalized(x, mean, inv_std) * _per_image(scale, x) + _per_image(shift, x)
  return nn.silu(out) if silu else out, (x, mean, inv_std, scale, shift)


def _group_norm_backward(num_groups, epsilon, silu, saved, grad_out):
  del epsilon
  # The barrier keeps XLA from merging the recomputation below with the forward pass's (CSE),
  # which would keep the forward's activations alive until here after all.
  x, mean, inv_std, scale, shift = jax.lax.optimization_barrier(saved)
  if silu:
    pre_silu = _normalized(x, mean, inv_std) * _per_image(scale, x) + _per_image(shift, x)
    sigmoid = jax.nn.sigmoid(pre_silu)
    grad_out = grad_out * sigmoid * (1 + pre_silu * (1 - sigmoid))
  # From per-channel sums of grad_out and grad_out·x only: a materialised normalised x would be
  # computed by XLA as soon as x is known and kept alive until here.
  batch, channels = x.shape[0], x.shape[-1]
  pixels = tuple(range(1, x.ndim - 1))
  sum_grad = jnp.sum(grad_out, axis=pixels)
  mean_c, inv_std_c = (_group_to_channels(v, channels) for v in (mean, inv_std))
  sum_grad_normalized = (jnp.sum(grad_out * x, axis=pixels) - mean_c * sum_grad) * inv_std_c
  per_image = scale.ndim == 2
  grad_scale = sum_grad_normalized if per_image else sum_grad_normalized.sum(0)
  grad_shift = sum_grad if per_image else sum_grad.sum(0)
  scale_c = jnp.broadcast_to(scale, (batch, channels))
  pixel_count = math.prod(x.shape[1:-1])
  mean_grad = _group_mean(sum_grad * scale_c, num_groups) / pixel_count
  mean_grad_dot = _group_mean(sum_grad_normalized * scale_c, num_groups) / pixel_count
  grad_x = _per_channel(inv_std, x) * (grad_out * _per_image(scale, x) - _per_channel(mean_grad, x)
                                       - _normalized(x, mean, inv_std) * _per_channel(mean_grad_dot, x))
  return grad_x, grad_scale, grad_shift


group_norm.defvjp(_group_norm_forward, _group_norm_backward)


class GroupNorm32(nn.Module):
  """GroupNorm over the last (channel) axis, computed in float32.

  guided_diffusion's `normalization(ch)`: 32 groups, eps 1e-5, affine; the
  result is cast back to the input dtype. The statistics take one pass
  (`group_norm`), the same as guided_diffusion's two-pass ones up to float32 rounding.

  `conditions` are (scale, shift) pairs [B, C] applied after the affine as
  h·(1 + scale) + shift, in order (scale-shift norm; shift may be 0), and `silu`
  applies SiLU: both inside `group_norm`, so that they save nothing more for the
  backward pass.
  """
  num_groups: int = 32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, conditions=(), silu: bool = False):
    c = x.shape[-1]
    if c % self.num_groups:
      raise UserError(f'GroupNorm32 at {self.path}: {c} channels are not divisible by '
                      f'{self.num_groups} groups; use channel counts that are multiples of 32.')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    for cond_scale, cond_shift in conditions:
      scale, bias = scale * (1 + cond_scale), bias * (1 + cond_scale) + cond_shift
    return group_norm(x.astype(jnp.float32), scale, bias, self.num_groups, self.epsilon, silu).astype(x.dtype)


def _conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_nhwc(x, kernel, strides, padding):
  """A convolution of x [B, H, W, Cin] with kernel [kh, kw, Cin, Cout], explicit padding.

  Its own gradient only for the kernel's: the same correlation of x with the output gradient
  as autodiff's, over an x padded beforehand instead of padding inside. XLA CPU's convolution
  itself runs faster so, but the padded copy it transposes costs more: the bench ADM's training
  step gains 1-1.5 % (four interleaved runs), and alone some shapes are slower.
  """
  return _conv(x, kernel, strides, padding)


def _conv_nhwc_forward(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_nhwc_backward(strides, padding, saved, grad_out):
  x, kernel = saved
  grad_x = jax.vjp(lambda a: _conv(a, kernel, strides, padding), x)[1](grad_out)[0]
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  # Channels as the batch, images as the features: [Cin, kh', kw', Cout], the strides as the
  # output gradient's dilation (its extent can exceed the kernel's by stride - 1 at the end).
  grad_kernel = jax.lax.conv_general_dilated(padded, grad_out, (1, 1), 'VALID', rhs_dilation=strides,
                                             dimension_numbers=('CHWN', 'IHWO', 'NHWC'))
  kh, kw = kernel.shape[:2]
  return grad_x, grad_kernel[:, :kh, :kw].transpose(1, 2, 0, 3).astype(kernel.dtype)


_conv_nhwc.defvjp(_conv_nhwc_forward, _conv_nhwc_backward)


def conv_general_dilated(x, kernel, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """jax.lax.conv_general_dilated as flax's nn.Conv calls it; on CPU through `_conv_nhwc` for
  the convolutions `conv2d` makes (NHWC/HWIO, explicit padding, no dilation, one group). Other
  backends keep autodiff's filter gradient, the form their convolution libraries are matched to
  (the gain was measured on XLA CPU only)."""
  nhwc = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ('NHWC', 'HWIO', 'NHWC'))
  if (jax.default_backend() == 'cpu' and dimension_numbers == nhwc and not isinstance(padding, str)
      and feature_group_count == 1 and precision is None and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))):
    return _conv_nhwc(x, kernel, tuple(window_strides), tuple(map(tuple, padding)))
  return jax.lax.conv_general_dilated(x, kernel, window_strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, precision=precision)


def conv2d(features: int, kernel_size: int = 3, stride: int = 1, *, zero_init: bool = False,
           dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Conv:
  """A PyTorch-equivalent Conv2d (padding k//2 on every side), NHWC/HWIO.

  Explicit padding (not 'SAME') so that stride 2 pads 1 pixel on both sides like
  PyTorch. `zero_init` is guided_diffusion's `zero_module`.
  """
  pad = kernel_size // 2
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.initializers.zeros if zero_init else torch_kernel_init,
      bias_init=nn.initializers.zeros, conv_general_dilated=conv_general_dilated, name=name)


def dense(features: int, *, zero_init: bool = False, dtype: Dtype = jnp.float32,
          name: str | None = None) -> nn.Dense:
  """A PyTorch-equivalent Linear (also used for 1x1 Conv1d over tokens)."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.initializers.zeros if zero_init else torch_kernel_init,
      bias_init=nn.initializers.zeros, name=name)


class Dropout(nn.Module):
  """flax's nn.Dropout (the same masks from the same 'dropout' rng when named alike) whose mask
  waits for the backward pass packed eight to a byte: with nn.Dropout, XLA fuses the Bernoulli
  comparison into the backward pass and keeps the random bits alive instead (8 bytes an element)."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0:
      return x
    keep_prob = 1 - self.rate
    keep = jax.random.bernoulli(self.make_rng('dropout'), keep_prob, x.shape)
    keep = jnp.unpackbits(jnp.packbits(keep.reshape(-1)), count=x.size).reshape(x.shape)
    return jnp.where(keep.astype(bool), x / keep_prob, 0)


def upsample_nearest(x):
  """2x nearest-neighbour upsampling of NHWC x."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x):
  """2x2 average pooling, stride 2 (PyTorch AvgPool2d(2): odd edges dropped)."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='VALID')


class Upsample(nn.Module):
  """Nearest 2x upsampling, then (if `use_conv`) a 3x3 conv keeping channels."""
  use_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = upsample_nearest(x)
    if self.use_conv:
      x = conv2d(x.shape[-1], 3, dtype=self.dtype, name='conv')(x)
    return x


class Downsample(nn.Module):
  """A 3x3 stride-2 conv (padding 1) if `use_conv`, else 2x2 average pooling."""
  use_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.use_conv:
      return conv2d(x.shape[-1], 3, stride=2, dtype=self.dtype, name='conv')(x)
    return avg_pool2(x)


class ResBlock(nn.Module):
  """guided_diffusion's ResBlock, optionally resampling (`up` / `down`).

  in:  GroupNorm32 → SiLU → [resample h and x] → conv3x3
  emb: SiLU → Linear → (scale, shift) if use_scale_shift_norm else an added bias
  out: GroupNorm32 (·(1+scale)+shift) → SiLU → Dropout → zero-init conv3x3
  skip: identity, or a 1x1 conv when the channel count changes.

  `code` [B, code_dim] is an extra global code (DiffusionRig's `detail_cond`):
  SiLU → Linear (`code_proj`) gives a second (scale, shift) applied right after
  the time embedding's, or a second added bias without scale-shift norm.
  With `code_shift=False` the code only scales: after the normalisation (and
  the time embedding's scale-shift) h ← h·(1 + code_proj(SiLU(code))), as
  Patch-DM / Diff-AE condition on their semantic code.
  """
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  code_shift: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, code=None, train: bool = False):
    out_ch = self.out_channels
    h = GroupNorm32(name='in_norm')(x, silu=True)
    if self.up:
      h, x = upsample_nearest(h), upsample_nearest(x)
    elif self.down:
      h, x = avg_pool2(h), avg_pool2(x)
    h = conv2d(out_ch, 3, dtype=self.dtype, name='in_conv')(h)

    emb_width = 2 * out_ch if self.use_scale_shift_norm else out_ch
    conds = [dense(emb_width, dtype=self.dtype, name='emb_proj')(nn.silu(emb))]
    code_scale = None
    if code is not None:
      code_out = dense(emb_width if self.code_shift else out_ch, dtype=self.dtype,
                       name='code_proj')(nn.silu(code))
      if self.code_shift:
        conds.append(code_out)
      else:
        code_scale = code_out.astype(jnp.float32)

    out_norm = GroupNorm32(name='out_norm')
    if self.use_scale_shift_norm:
      conditions = [jnp.split(cond.astype(jnp.float32), 2, axis=-1) for cond in conds]
    else:
      h, conditions = sum((c.astype(h.dtype)[:, None, None, :] for c in conds), h), []
    if code_scale is not None:
      conditions.append((code_scale, 0.0))
    h = out_norm(h, conditions, silu=True)
    h = Dropout(self.dropout)(h, deterministic=not train)
    h = conv2d(out_ch, 3, zero_init=True, dtype=self.dtype, name='out_conv')(h)

    if x.shape[-1] != out_ch:
      x = conv2d(out_ch, 1, dtype=self.dtype, name='skip')(x)
    return x + h


class AttentionBlock(nn.Module):
  """Self-attention over all pixels, with a zero-init output projection.

  GroupNorm32 → qkv (1x1) → multi-head attention with 1/sqrt(sqrt(ch)) on both q
  and k → proj_out (1x1, zero-init) → residual. `num_head_channels` (if not -1)
  overrides `num_heads`. The qkv channel layout is per head [q|k|v] (legacy,
  QKVAttentionLegacy) or [q heads|k heads|v heads] with
  `use_new_attention_order` (QKVAttention).
  """
  num_heads: int = 1
  num_head_channels: int = -1
  use_new_attention_order: bool = False
  attn_impl: str = 'xla'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    if self.num_head_channels == -1:
      heads = self.num_heads
    elif c % self.num_head_channels:
      raise UserError(f'AttentionBlock at {self.path}: {c} channels are not divisible by '
                      f'num_head_channels={self.num_head_channels}.')
    else:
      heads = c // self.num_head_channels
    if c % heads:
      raise UserError(f'AttentionBlock at {self.path}: {c} channels are not divisible by num_heads={heads}.')
    ch = c // heads

    tokens = x.reshape(b, height * width, c)
    qkv = dense(3 * c, dtype=self.dtype, name='qkv')(GroupNorm32(name='norm')(tokens))
    if self.use_new_attention_order:
      qkv = qkv.reshape(b, height * width, 3, heads, ch)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      qkv = qkv.reshape(b, height * width, heads, 3, ch)
      q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    a = dot_product_attention(q, k, v, impl=self.attn_impl, scale=1 / math.sqrt(ch))
    a = a.reshape(b, height * width, c)
    h = dense(c, zero_init=True, dtype=self.dtype, name='proj_out')(a)
    return (tokens + h).reshape(x.shape)
