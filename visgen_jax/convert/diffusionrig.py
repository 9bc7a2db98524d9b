"""DiffusionRig's released checkpoint and torchvision ResNet-18 state dicts → this project's params.

A DiffusionRig `model{step}.pt` holds `denoisingUNet.*` (guided_diffusion's
UNetModel with `cond_emb_layers`) and `encoder.*` (torchvision resnet18 with
fc [64, 512], BatchNorm running statistics included). It becomes the params of
the diffusionrig system: {'unet': ..., 'encoder': ..., 'batch_stats': {'encoder': ...}}.
"""

from collections.abc import Mapping

import flax
import numpy as np

from visgen_jax.convert import guided_diffusion, pytorch
from visgen_jax.errors import UserError
from visgen_jax.models.adm_unet import ADMUNet

UNET_PREFIX, ENCODER_PREFIX = 'denoisingUNet.', 'encoder.'
# torchvision BatchNorm2d leaf → (collection, Flax leaf).
_BN_LEAVES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def is_diffusionrig(state_dict: Mapping) -> bool:
  return any(k.startswith(UNET_PREFIX) for k in state_dict) and any(k.startswith(ENCODER_PREFIX) for k in state_dict)


def convert_resnet_state_dict(state_dict: Mapping[str, np.ndarray]):
  """(params, batch_stats) of models.resnet.ResNet18 from a torchvision resnet18 state dict."""
  flat = {'params': {}, 'batch_stats': {}}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition('.')
    if leaf == 'num_batches_tracked':  # torch's counter; momentum is fixed, so unused
      continue
    # layer1.0.downsample.1 → layer1_0/downsample_1
    parts = module.split('.')
    path = tuple(f'{a}_{b}' for a, b in zip(parts[::2], parts[1::2])) + ((parts[-1],) if len(parts) % 2 else ())
    array = np.asarray(value, np.float32)
    if array.ndim in (2, 4):  # conv and fc weights
      flat['params'][path + ('kernel',)] = pytorch.to_flax(array, ('kernel',))
    elif module == 'fc':
      flat['params'][path + ('bias',)] = array
    elif leaf in _BN_LEAVES:
      collection, name = _BN_LEAVES[leaf]
      flat[collection][path + (name,)] = array
    else:
      raise UserError(f'encoder key {key} is not part of a torchvision resnet18.')
  return tuple(flax.traverse_util.unflatten_dict(flat[c]) for c in ('params', 'batch_stats'))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], image_size: int) -> dict:
  """The diffusionrig system's params from a DiffusionRig checkpoint's state dict."""
  unet_sd = {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
  encoder_sd = {k[len(ENCODER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
  unet = ADMUNet(**guided_diffusion.infer_unet_config(unet_sd, image_size))
  encoder, stats = convert_resnet_state_dict(encoder_sd)
  return {'unet': guided_diffusion.convert_unet_state_dict(unet_sd, unet), 'encoder': encoder,
          'batch_stats': {'encoder': stats}}
