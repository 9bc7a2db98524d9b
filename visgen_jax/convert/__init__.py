"""PyTorch checkpoints → Flax parameters: a library the trainer and the
`python -m visgen_jax.convert` command both use."""

import numpy as np

from visgen_jax.convert import clip, diffusionrig, guided_diffusion, mask2former, pytorch
from visgen_jax.errors import UserError
from visgen_jax.models import clip as clip_lib
from visgen_jax.models.adm_unet import ADMUNet


def read_foreign(path: str, config) -> dict:
  """The Flax parameters of a foreign checkpoint file, its kind recognised from its keys:
  a guided_diffusion UNetModel (attention placed with config.model.image_size, else
  config.data.resolution), a DiffusionRig model (denoisingUNet + encoder), a detectron2 Mask2Former
  proposal network (Mask2Former's params), a torchvision ResNet ({'backbone'} of the proposal
  network) or CLIP ({'visual', 'text', 'logit_scale'}; weights do not depend on the activation, so
  none is asked for)."""
  state_dict, _ = pytorch.load_state_dict(path)  # reads .pt, .bin, .safetensors and TorchScript
  if 'input_blocks.0.0.weight' in state_dict:
    image_size = config.get('model', {}).get('image_size') or config.data.resolution
    fields = guided_diffusion.infer_unet_config(state_dict, int(np.max(image_size)))
    return guided_diffusion.convert_unet_state_dict(state_dict, ADMUNet(**fields))
  if diffusionrig.is_diffusionrig(state_dict):
    return diffusionrig.convert_state_dict(state_dict, int(config.model.image_size))
  if mask2former.is_mask2former(state_dict):
    return mask2former.convert_state_dict(state_dict, where=path)[1]
  if mask2former.is_torchvision_resnet(state_dict):
    return mask2former.convert_torchvision_resnet(state_dict, where=path)[0]
  if any(k.startswith('visual.') for k in state_dict):
    model = clip_lib.clip_model(clip.infer_clip_config(state_dict, 'quick_gelu'))
    return clip.convert_clip_state_dict(state_dict, model)
  raise UserError(f'{path}: not a checkpoint this project can read (not a guided_diffusion UNetModel, '
                  'a DiffusionRig model, a Mask2Former proposal network, a torchvision ResNet or a CLIP '
                  'state dict); convert it first or give a workdir.')
