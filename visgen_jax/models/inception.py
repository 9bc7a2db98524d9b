"""The FID InceptionV3 (pytorch-fid's port of TensorFlow's 2015-12-05 graph) in Flax linen, NHWC.

torchvision's InceptionV3 layout with 1008 classes and no auxiliary head, and pytorch-fid's FID
blocks: Mixed_5b/5c/5d, 6b–6e and 7b pool their branch with a 3×3 stride-1 average pool that
leaves the zero padding out of the count (as TensorFlow does), Mixed_7c with a 3×3 max pool.
Module and parameter names are torchvision's (`Mixed_6d/branch1x1/kernel`), so converting
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` is a renaming (visgen_jax.convert.inception).

Input: images [N, H, W, 3] in [0, 1], any size; resized bilinearly to 299² (PyTorch's
align_corners=False, no antialiasing) and scaled to [-1, 1], as pytorch-fid does. Outputs:
  pool             [N, 2048]  the final average pool ("pool_3"): FID, KID, precision/recall
  logits           [N, 1008]  fc(pool), pytorch-fid's `fc` (TensorFlow's softmax/logits)
  logits_unbiased  [N, 1008]  pool @ fc.kernel without the bias: the Inception Score's input in
                              the ADM evaluator (softmax/logits/MatMul) and torch-fidelity
  spatial          [N, 2023]  the sFID features: channels 0–6 of Mixed_6d.branch1x1, 17×17×7
                              flattened in (row, column, channel) order

The sFID tensor. The ADM evaluator (guided-diffusion evaluations/evaluator.py) reads
"mixed_6/conv:0" from TensorFlow's classify_image_graph_def.pb, keeps [..., :7] of the NHWC
tensor and flattens it per image. In that graph the eleven Inception blocks are the name scopes
mixed, mixed_1, ..., mixed_10 in network order, which are torchvision's Mixed_5b, 5c, 5d, 6a,
6b, 6c, 6d, 6e, 7a, 7b, 7c: mixed_6 is Mixed_6d. Inside a block the multi-layer branches live in
scopes tower, tower_1, tower_2, and the one-layer 1×1 branch is the block's own `conv`, i.e.
branch1x1. Within a layer scope the graph's ops run conv2d_params, Conv2D, batchnorm,
CheckNumerics, control_dependency and finally the op named by the scope itself, so
"mixed_6/conv:0" is the activation after the batch norm (the ReLU, torchvision's BasicConv2d
output), 17×17×192. Evidence used (no TensorFlow or weights here to run the graph): the op
listing of classify_image_graph_def.pb printed in the Tensorflex project's documentation (the
order above, and the block scope names); the layer-by-layer dumps of the graph in public porting
scripts (mixed_6/conv listed first in mixed_6, before its towers); and torch-fidelity's
convert_inception_weights.py, which maps 'mixed_6/conv/conv2d_params' to
'Mixed_6d.branch1x1.conv' and every other scope consistently (mixed_7 → Mixed_6e, so a port
that reads Mixed_6e.branch1x1 is one block late). The shape agrees: only the 6x blocks run at
17×17, and their 1×1 branch has 192 ≥ 7 channels.

Batch norm runs in inference form (running statistics, eps 1e-3 as in the TensorFlow graph),
folded into the convolution (kernel · γ/√(σ²+ε), bias β − μ·γ/√(σ²+ε)): the same function, one
pass fewer over the activations. Parameters are float32, running statistics included.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps the first 7 channels of mixed_6/conv
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
# The outputs: name → width.
OUTPUT_DIMS = {'pool': POOL_DIM, 'logits': NUM_CLASSES, 'logits_unbiased': NUM_CLASSES,
               'spatial': SPATIAL_DIM}
BN_EPS = 1e-3


class ConvBN(nn.Module):
  """torchvision's BasicConv2d: convolution without bias, batch norm (inference), ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    scale = self.param('scale', nn.initializers.ones, (self.features,))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    factor = scale * jax.lax.rsqrt(var + BN_EPS)
    kernel = kernel * factor
    if self.kernel_size == (1, 1) and self.strides == 1:
      y = x @ kernel[0, 0]  # XLA:CPU runs a matmul ~2x faster than the same 1x1 convolution
    else:
      # XLA:CPU runs a convolution without any padding ~3x slower than a padded one: one more
      # column on the right, which no kept output reads, when there is none.
      ph, pw = self.padding
      extra = int(self.padding == (0, 0))
      y = jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides),
                                       ((ph, ph), (pw, pw + extra)),
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      width = (x.shape[2] + 2 * pw - self.kernel_size[1]) // self.strides + 1
      y = y[:, :, :width]
    return nn.relu(y + (bias - mean * factor))


def _avg_pool_3x3(x):
  # TensorFlow's average pool: the padded zeros do not count.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride_2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (FIDInceptionA)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    branch1x1 = ConvBN(64, (1, 1), name='branch1x1')(x)
    branch5x5 = ConvBN(48, (1, 1), name='branch5x5_1')(x)
    branch5x5 = ConvBN(64, (5, 5), padding=(2, 2), name='branch5x5_2')(branch5x5)
    branch3x3dbl = ConvBN(64, (1, 1), name='branch3x3dbl_1')(x)
    branch3x3dbl = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(branch3x3dbl)
    branch_pool = ConvBN(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: 35² → 17²."""

  @nn.compact
  def __call__(self, x):
    branch3x3 = ConvBN(384, (3, 3), strides=2, name='branch3x3')(x)
    branch3x3dbl = ConvBN(64, (1, 1), name='branch3x3dbl_1')(x)
    branch3x3dbl = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = ConvBN(96, (3, 3), strides=2, name='branch3x3dbl_3')(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b–6e (FIDInceptionC). Returns the block's output and its branch1x1 (Mixed_6d's
  is TensorFlow's mixed_6/conv, the sFID features)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    branch1x1 = ConvBN(192, (1, 1), name='branch1x1')(x)
    branch7x7 = ConvBN(c7, (1, 1), name='branch7x7_1')(x)
    branch7x7 = ConvBN(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(branch7x7)
    branch7x7 = ConvBN(192, (7, 1), padding=(3, 0), name='branch7x7_3')(branch7x7)
    dbl = ConvBN(c7, (1, 1), name='branch7x7dbl_1')(x)
    dbl = ConvBN(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(dbl)
    dbl = ConvBN(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(dbl)
    dbl = ConvBN(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(dbl)
    dbl = ConvBN(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(dbl)
    branch_pool = ConvBN(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1), branch1x1


class InceptionD(nn.Module):
  """Mixed_7a: 17² → 8²."""

  @nn.compact
  def __call__(self, x):
    branch3x3 = ConvBN(192, (1, 1), name='branch3x3_1')(x)
    branch3x3 = ConvBN(320, (3, 3), strides=2, name='branch3x3_2')(branch3x3)
    branch7x7x3 = ConvBN(192, (1, 1), name='branch7x7x3_1')(x)
    branch7x7x3 = ConvBN(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
    branch7x7x3 = ConvBN(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
    branch7x7x3 = ConvBN(192, (3, 3), strides=2, name='branch7x7x3_4')(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, average pool without padding) and Mixed_7c (FIDInceptionE_2,
  max pool: the TensorFlow graph has one there)."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    branch1x1 = ConvBN(320, (1, 1), name='branch1x1')(x)
    branch3x3 = ConvBN(384, (1, 1), name='branch3x3_1')(x)
    branch3x3 = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(branch3x3),
        ConvBN(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(branch3x3)], axis=-1)
    dbl = ConvBN(448, (1, 1), name='branch3x3dbl_1')(x)
    dbl = ConvBN(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(dbl)
    dbl = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(dbl),
        ConvBN(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(dbl)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    branch_pool = ConvBN(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


def _linear_taps(size_in: int, size_out: int):
  """PyTorch's bilinear taps along one axis (align_corners=False, no antialiasing): source
  positions (i + 0.5) · in/out − 0.5 clamped at 0, in float32 as PyTorch computes them, as
  (lower index, upper index, upper weight)."""
  f32 = np.float32
  scale = f32(size_in) / f32(size_out)
  position = np.maximum((np.arange(size_out, dtype=f32) + f32(0.5)) * scale - f32(0.5), f32(0))
  lower = np.minimum(np.floor(position).astype(np.int32), size_in - 1)
  upper = np.minimum(lower + 1, size_in - 1)
  return lower, upper, (position - lower).astype(f32)


def resize_to_input(images):
  """[N, H, W, C] → [N, 299, 299, C], bilinear as PyTorch's F.interpolate(mode='bilinear',
  align_corners=False): two taps per axis, no antialiasing when shrinking."""
  for axis in (1, 2):
    lower, upper, weight = _linear_taps(images.shape[axis], INPUT_SIZE)
    weight = weight.reshape([-1 if a == axis else 1 for a in range(4)])
    images = (jnp.take(images, lower, axis=axis) * (1 - weight)
              + jnp.take(images, upper, axis=axis) * weight)
  return images


class InceptionV3(nn.Module):
  """The FID Inception: images [N, H, W, 3] in [0, 1] → {pool, logits, logits_unbiased,
  spatial} (see the module docstring)."""

  @nn.compact
  def __call__(self, images):
    x = 2 * resize_to_input(images.astype(jnp.float32)) - 1
    x = ConvBN(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = ConvBN(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_stride_2(x)
    x = ConvBN(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = ConvBN(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_stride_2(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x, _ = InceptionC(128, name='Mixed_6b')(x)
    x, _ = InceptionC(160, name='Mixed_6c')(x)
    x, mixed_6_conv = InceptionC(160, name='Mixed_6d')(x)
    x, _ = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    pool = x.mean(axis=(1, 2))
    fc = nn.Dense(NUM_CLASSES, name='fc')
    logits = fc(pool)
    logits_unbiased = pool @ fc.variables['params']['kernel']
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(len(images), -1)
    return {'pool': pool, 'logits': logits, 'logits_unbiased': logits_unbiased,
            'spatial': spatial}
