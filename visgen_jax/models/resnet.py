"""torchvision's ResNet-18 in Flax linen, NHWC, with its BatchNorm statistics.

Same layers and names as `torchvision.models.resnet18` (conv1, bn1, layer1_0
... layer4_1 with conv1/bn1/conv2/bn2 and downsample_0/downsample_1, fc), so
its state dicts convert by name (`visgen_jax.convert.diffusionrig`). The
statistics live in the 'batch_stats' collection: `train=True` normalises with
the batch's statistics and returns updated running ones (apply with
mutable=['batch_stats']); `train=False` uses the running ones.
"""

import flax.linen as nn
import jax.numpy as jnp

# torch's BatchNorm2d: running = 0.9 running + 0.1 batch, eps 1e-5.
_BN = dict(momentum=0.9, epsilon=1e-5)


def _conv(features, kernel, stride, name):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'), name=name)


class BasicBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, **_BN, name=name)
    h = nn.relu(norm('bn1')(_conv(self.features, 3, self.stride, 'conv1')(x)))
    h = norm('bn2')(_conv(self.features, 3, 1, 'conv2')(h))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = norm('downsample_1')(_conv(self.features, 1, self.stride, 'downsample_0')(x))
    return nn.relu(h + x)


class ResNet18(nn.Module):
  """x [B, H, W, 3] → [B, num_outputs]; the input is used as given (no normalisation)."""
  num_outputs: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = _conv(64, 7, 2, 'conv1')(x.astype(jnp.float32))
    h = nn.relu(nn.BatchNorm(use_running_average=not train, **_BN, name='bn1')(h))
    h = nn.max_pool(h, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, features in enumerate((64, 128, 256, 512)):
      for i in range(2):
        stride = 2 if stage and not i else 1
        h = BasicBlock(features, stride, name=f'layer{stage + 1}_{i}')(h, train)
    return nn.Dense(self.num_outputs, name='fc')(h.mean(axis=(1, 2)))  # adaptive average pool to 1x1
