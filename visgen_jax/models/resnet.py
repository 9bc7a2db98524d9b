"""torchvision's ResNets (18, 50, 101) in Flax linen, NHWC.

Same layers and names as `torchvision.models.resnet*` (conv1, bn1, layer1_0 ...
with conv1/bn1/conv2/bn2[/conv3/bn3] and downsample_0/downsample_1, fc), so
their state dicts convert by name (`visgen_jax.convert.diffusionrig`). Bottleneck
blocks put the stride in the 3x3 conv (torchvision, and detectron2 with
STRIDE_IN_1X1 False).

Norms: norm='batch' keeps BatchNorm statistics in the 'batch_stats' collection:
`train=True` normalises with the batch's statistics and returns updated running
ones (apply with mutable=['batch_stats']); `train=False` uses the running ones.
norm='frozen' is detectron2's FrozenBatchNorm: a fixed affine from params
scale, bias, mean, var (no batch_stats); training must freeze them
(`FROZEN_NORMS` below, as config.frozen).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


# torch's BatchNorm2d: running = 0.9 running + 0.1 batch, eps 1e-5.
_BN = dict(momentum=0.9, epsilon=1e-5)
# config.frozen regex for every frozen norm of a ResNet under top-level params key 'backbone'.
FROZEN_NORMS = r'^backbone/(.*/)?(bn\d|downsample_1)/'
BLOCKS = {18: ('basic', (2, 2, 2, 2)), 50: ('bottleneck', (3, 4, 6, 3)), 101: ('bottleneck', (3, 4, 23, 3))}


def _conv(features, kernel, stride, name):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'), name=name)


class FrozenBatchNorm(nn.Module):
  """x·scale/sqrt(var + eps) + bias − mean·scale/sqrt(var + eps), all four fixed."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale, bias = self.param('scale', nn.initializers.ones, (c,)), self.param('bias', nn.initializers.zeros, (c,))
    mean, var = self.param('mean', nn.initializers.zeros, (c,)), self.param('var', nn.initializers.ones, (c,))
    factor = scale * jax.lax.rsqrt(var + self.epsilon)
    return x * factor + (bias - mean * factor)


def _norm(kind, train, name):
  if kind == 'frozen':
    return FrozenBatchNorm(name=name)
  return nn.BatchNorm(use_running_average=not train, **_BN, name=name)


class Block(nn.Module):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 ×4) residual block of `planes` inner channels."""
  kind: str
  planes: int
  stride: int = 1
  norm: str = 'batch'

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: _norm(self.norm, train, name)
    if self.kind == 'basic':
      h = nn.relu(norm('bn1')(_conv(self.planes, 3, self.stride, 'conv1')(x)))
      h = norm('bn2')(_conv(self.planes, 3, 1, 'conv2')(h))
    else:
      h = nn.relu(norm('bn1')(_conv(self.planes, 1, 1, 'conv1')(x)))
      h = nn.relu(norm('bn2')(_conv(self.planes, 3, self.stride, 'conv2')(h)))
      h = norm('bn3')(_conv(self.planes * 4, 1, 1, 'conv3')(h))
    if self.stride != 1 or x.shape[-1] != h.shape[-1]:
      x = norm('downsample_1')(_conv(h.shape[-1], 1, self.stride, 'downsample_0')(x))
    return nn.relu(h + x)


class ResNet(nn.Module):
  """x [B, H, W, 3] → [B, num_outputs], or with num_outputs=None the stage outputs
  {'res2': stride 4, 'res3': 8, 'res4': 16, 'res5': 32}; the input is used as given
  (no normalisation). `width` is the stem's channels (torchvision: 64); stage k has
  width·2^k inner channels."""
  num_outputs: int | None = 1000
  depth: int = 50
  width: int = 64
  norm: str = 'batch'

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in BLOCKS:
      raise ValueError(f'ResNet depth={self.depth} is not built; allowed: {", ".join(map(str, BLOCKS))}.')
    kind, stage_sizes = BLOCKS[self.depth]
    h = _conv(self.width, 7, 2, 'conv1')(x.astype(jnp.float32))
    h = nn.relu(_norm(self.norm, train, 'bn1')(h))
    h = nn.max_pool(h, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    features = {}
    for stage, blocks in enumerate(stage_sizes):
      for i in range(blocks):
        stride = 2 if stage and not i else 1
        h = Block(kind, self.width * 2**stage, stride, self.norm, name=f'layer{stage + 1}_{i}')(h, train)
      features[f'res{stage + 2}'] = h
    if self.num_outputs is None:
      return features
    return nn.Dense(self.num_outputs, name='fc')(h.mean(axis=(1, 2)))  # adaptive average pool to 1x1


class ResNet18(ResNet):
  depth: int = 18
