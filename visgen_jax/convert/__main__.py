"""PyTorch checkpoint → Flax params, written with Orbax.

  python -m visgen_jax.convert --kind=guided_diffusion --input=ffhq.pt --output=DIR \\
      [--config=configs/adm_ffhq256.py[:variant] [--config.model.key=value ...] | --image_size=256]

  python -m visgen_jax.convert --kind=clip --input=ViT-L-14-336px.pt --output=DIR \\
      [--preset=ViT-L-14-336-quickgelu] [--act=quick_gelu|gelu]

With --config, the UNet is built from `config.model` (ADMUNet fields). Without
it, the architecture is inferred from the checkpoint's shapes and --image_size;
attention heads and dropout are not stored in weights, so pass the config when
you later build the model. DIR (which must not exist) is written atomically by
Orbax's StandardCheckpointer; restore it with
`ocp.StandardCheckpointer().restore(DIR)`. The model fields used are printed as
JSON on the last line of stdout. Mistakes end with one sentence and exit code 2.

--kind=clip reads an OpenAI CLIP or open_clip checkpoint (.pt, .bin, .safetensors,
or OpenAI's TorchScript archive) into `CLIP` params {'visual', 'text',
'logit_scale'}. Without --preset the architecture is read off the weights
(heads = width // 64); the activation is not stored in weights, so --act is needed
unless the file is one of OpenAI's archives (QuickGELU). The config used is
printed as JSON; build the model with `visgen_jax.models.clip.clip_model(config)`.

  python -m visgen_jax.convert --kind=inception --input=pt_inception-2015-12-05-6726825d.pth --output=DIR

--kind=inception reads pytorch-fid's FID Inception weights into
`visgen_jax.models.inception.InceptionV3` params; DIR then serves as --inception of
`python -m visgen_jax.fid` and the fid evaluator on machines without torch.

  python -m visgen_jax.convert --kind=mask2former --input=mask_proposal_network.pth --output=DIR

--kind=mask2former reads a detectron2 Mask2Former checkpoint (MaskCLIP's proposal network) into
`visgen_jax.models.mask2former.Mask2Former` params (fields read off the weights, printed), or a
torchvision ResNet state dict into its {'backbone'} params; keys it cannot map are printed. DIR
then serves as config.model.proposal_checkpoint of MaskCLIP or as config.init_from.
"""

import json
import os

from absl import flags

from visgen_jax import cli
from visgen_jax.errors import UserError, for_setting

KINDS = ('guided_diffusion', 'clip', 'inception', 'mask2former')

flags.DEFINE_enum('kind', 'guided_diffusion', KINDS, 'Checkpoint format of --input.')
flags.DEFINE_string('input', None, 'PyTorch state dict file (.pt) to convert.')
flags.DEFINE_string('output', None, 'Directory to write the Flax params to; must not exist yet.')
flags.DEFINE_string('config', None, 'configs/<experiment>.py[:variant] whose `model` group holds the ADMUNet '
                    'fields; override keys with --config.key=value.')
flags.DEFINE_integer('image_size', None, 'Image size in pixels, to place attention layers when the '
                     'architecture is inferred (no --config).')
flags.DEFINE_string('preset', None, 'With --kind=clip: a visgen_jax.models.clip.CLIP_PRESETS name; '
                    'default: inferred from the checkpoint.')
flags.DEFINE_enum('act', None, ('gelu', 'quick_gelu'), 'With --kind=clip: the activation the weights '
                  'were trained with (QuickGELU for OpenAI weights).')
FLAGS = flags.FLAGS

_overrides = []


def _model_kwargs(state_dict) -> dict:
  """ADMUNet fields from --config, or inferred from the checkpoint and --image_size."""
  from visgen_jax.convert import guided_diffusion
  from visgen_jax.models.adm_unet import ADMUNet, adm_layout
  if FLAGS.config:
    from visgen_jax.train import config as config_lib
    config = config_lib.load_config(FLAGS.config, _overrides)
    if 'model' not in config:
      raise UserError(f'--config={FLAGS.config} has no `model` group of ADMUNet fields.')
    kwargs = config.model.to_dict()
    fields = set(ADMUNet.__dataclass_fields__) - {'parent', 'name'}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
      raise UserError(f'--config={FLAGS.config}: config.model has keys {", ".join(unknown)} that are not '
                      f'ADMUNet fields; allowed: {", ".join(sorted(fields))}.')
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    with for_setting('config.model'):
      adm_layout(ADMUNet(**kwargs))
    return kwargs
  if _overrides:
    raise UserError('--config.key=value overrides need --config.')
  if not FLAGS.image_size:
    raise UserError('without --config, --image_size is needed to place the attention layers, e.g. --image_size=256.')
  return guided_diffusion.infer_unet_config(state_dict, FLAGS.image_size)


def _save(output, params):
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(output, params)
  checkpointer.wait_until_finished()


def run(argv):
  del argv
  if not FLAGS.input or not FLAGS.output:
    raise UserError('--input and --output are required, e.g. --input=model.pt --output=/tmp/params.')
  output = os.path.abspath(FLAGS.output)
  if os.path.exists(output):
    raise UserError(f'--output={FLAGS.output} already exists; choose a new directory.')

  clip_only = [f'--{name}' for name in ('preset', 'act') if FLAGS[name].value is not None]
  other_only = [f'--{name}' for name in ('config', 'image_size') if FLAGS[name].value is not None]
  if FLAGS.kind == 'inception':
    if clip_only or other_only or _overrides:
      raise UserError(f'{", ".join(clip_only + other_only) or "--config.*"} do not apply to '
                      '--kind=inception, which reads only --input.')
    from visgen_jax.convert import inception
    _save(output, inception.load_inception(FLAGS.input, '--input'))
    print(json.dumps({'output': output, 'model': 'InceptionV3'}))
    return
  if FLAGS.kind == 'mask2former':
    if clip_only or other_only or _overrides:
      raise UserError(f'{", ".join(clip_only + other_only) or "--config.*"} do not apply to '
                      '--kind=mask2former, which reads only --input.')
    from visgen_jax.convert import mask2former, pytorch
    state_dict = pytorch.load_state_dict(FLAGS.input)[0]
    if mask2former.is_torchvision_resnet(state_dict):
      params, unmapped = mask2former.convert_torchvision_resnet(state_dict, FLAGS.input)
      fields = 'torchvision ResNet backbone'
    else:
      fields, params, unmapped = mask2former.convert_state_dict(state_dict, where=FLAGS.input)
      if not mask2former.has_class_head(state_dict):
        fields = dict(fields, class_head='absent in the checkpoint: zero-filled, every query scores 0.5')
    _save(output, params)
    print(json.dumps({'output': output, 'model': fields, 'unmapped': unmapped}))
    return
  if FLAGS.kind == 'clip':
    if other_only or _overrides:
      raise UserError(f'{", ".join(other_only) or "--config.*"} do not apply to --kind=clip; '
                      'use --preset and --act.')
    from visgen_jax.convert import clip
    from visgen_jax.models import clip as clip_lib
    preset = None
    if FLAGS.preset is not None:
      with for_setting('--preset'):
        preset = clip_lib.clip_config(FLAGS.preset)
    config, params = clip.load_clip_checkpoint(FLAGS.input, preset, act=FLAGS.act)
    _save(output, params)
    print(json.dumps({'output': output, 'config': config}))
    return
  if clip_only:
    raise UserError(f'{", ".join(clip_only)} apply to --kind=clip only.')
  from visgen_jax.convert import guided_diffusion, pytorch
  from visgen_jax.models.adm_unet import ADMUNet
  state_dict = pytorch.load_state_dict(FLAGS.input)[0]
  kwargs = _model_kwargs(state_dict)
  params = guided_diffusion.convert_unet_state_dict(state_dict, ADMUNet(**kwargs))
  _save(output, params)
  print(json.dumps({'output': output, 'model': kwargs}, default=str))


def main():
  cli.run(run, _overrides)


if __name__ == '__main__':
  main()
