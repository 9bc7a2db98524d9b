"""OpenAI CLIP / open_clip state dicts → `visgen_jax.models.clip` params.

Both projects name CLIP's weights alike (`visual.conv1.weight`,
`visual.transformer.resblocks.3.attn.in_proj_weight`, `token_embedding.weight`,
`text_projection`, `logit_scale`, ...); OpenAI's files are TorchScript archives
in float16 with three extra integer entries (input_resolution, context_length,
vocab_size), open_clip's are plain (possibly `{'state_dict': ...}`-wrapped,
possibly 'module.'-prefixed) state dicts. PyTorch's fused attention in-projection
stays fused (`in_proj`, channels [q | k | v]); convolutions go OIHW → HWIO and
Linear weights [out, in] → [in, out]. Parameters come out float32.

The activation leaves no trace in the weights: OpenAI's models (and open_clip's
`*-quickgelu` / 'openai' weights) need act='quick_gelu', open_clip's own
trainings of plain names act='gelu'.
"""

import re
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.convert import pytorch
from visgen_jax.errors import UserError
from visgen_jax.models import clip as clip_lib

# Config, not weights: OpenAI's archives carry the integers, scripted open_clip models
# their causal mask buffer.
_IGNORED = ('input_resolution', 'context_length', 'vocab_size', 'attn_mask')
_BLOCK = {
    'ln_1.weight': ('ln_1', 'scale'), 'ln_1.bias': ('ln_1', 'bias'),
    'attn.in_proj_weight': ('in_proj', 'kernel'), 'attn.in_proj_bias': ('in_proj', 'bias'),
    'attn.out_proj.weight': ('out_proj', 'kernel'), 'attn.out_proj.bias': ('out_proj', 'bias'),
    'ln_2.weight': ('ln_2', 'scale'), 'ln_2.bias': ('ln_2', 'bias'),
    'mlp.c_fc.weight': ('c_fc', 'kernel'), 'mlp.c_fc.bias': ('c_fc', 'bias'),
    'mlp.c_proj.weight': ('c_proj', 'kernel'), 'mlp.c_proj.bias': ('c_proj', 'bias'),
}
_VISUAL = {
    'conv1.weight': ('conv1', 'kernel'), 'class_embedding': ('class_embedding',),
    'positional_embedding': ('positional_embedding',), 'proj': ('proj',),
    'ln_pre.weight': ('ln_pre', 'scale'), 'ln_pre.bias': ('ln_pre', 'bias'),
    'ln_post.weight': ('ln_post', 'scale'), 'ln_post.bias': ('ln_post', 'bias'),
}
_TEXT = {
    'token_embedding.weight': ('token_embedding', 'embedding'),
    'positional_embedding': ('positional_embedding',), 'text_projection': ('text_projection',),
    'ln_final.weight': ('ln_final', 'scale'), 'ln_final.bias': ('ln_final', 'bias'),
}
_RESBLOCK = re.compile(r'transformer\.resblocks\.(\d+)\.(.+)')


def _tower_path(key: str, table: Mapping) -> tuple[str, ...] | None:
  """Flax path inside one tower of a (prefix-stripped) PyTorch key, or None."""
  match = _RESBLOCK.fullmatch(key)
  if match:
    sub = _BLOCK.get(match.group(2))
    return None if sub is None else (f'resblocks_{match.group(1)}',) + sub
  return table.get(key)


def _tower(key: str) -> str:
  if key == 'logit_scale':
    return key
  return 'visual' if key.startswith('visual.') else 'text'


def flax_path(key: str) -> tuple[str, ...] | None:
  """Flax path in CLIP's params ('visual' / 'text' / 'logit_scale') of a PyTorch key, or None."""
  if key == 'logit_scale':
    return ('logit_scale',)
  if key.startswith('visual.'):
    path = _tower_path(key[len('visual.'):], _VISUAL)
    return None if path is None else ('visual',) + path
  path = _tower_path(key, _TEXT)
  return None if path is None else ('text',) + path


def _to_flax(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  if path == ('logit_scale',):  # a scalar, or [1] in some open_clip versions
    return array.reshape(())
  return pytorch.to_flax(array, path)


def abstract_params(model):
  """Shapes of the params of a CLIP, VisionTransformer or TextTransformer, without allocating."""
  if isinstance(model, clip_lib.TextTransformer):
    args = (jax.ShapeDtypeStruct((1, model.context_length), jnp.int32),)
  else:
    vision = model.visual if isinstance(model, clip_lib.CLIP) else model
    args = (jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size, 3), jnp.float32),)
    if isinstance(model, clip_lib.CLIP):
      args += (jax.ShapeDtypeStruct((1, model.text.context_length), jnp.int32),)
  return jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *args)['params']


def convert_clip_state_dict(state_dict: Mapping, model) -> dict:
  """Flax params (float32 numpy) for `model` from an OpenAI CLIP or open_clip state dict.

  Args:
    state_dict: name → array (numpy or anything `np.asarray` takes).
    model: a `CLIP` (every key is used), a `VisionTransformer` (only 'visual.*'
      keys are read) or a `TextTransformer` (only the text tower's keys are read).

  Raises UserError when a key of the tower(s) read has no counterpart, a param
  has no key, or a shape differs.
  """
  if isinstance(model, clip_lib.CLIP):
    prefix, towers = (), ('visual', 'text', 'logit_scale')
  elif isinstance(model, clip_lib.VisionTransformer):
    prefix, towers = ('visual',), ('visual',)
  elif isinstance(model, clip_lib.TextTransformer):
    prefix, towers = ('text',), ('text',)
  else:
    raise UserError(f'CLIP weights convert into a CLIP, VisionTransformer or TextTransformer, '
                    f'not a {type(model).__name__}.')
  expected = {prefix + path: leaf for path, leaf in
              flax.traverse_util.flatten_dict(abstract_params(model)).items()}
  flat, _ = pytorch.map_state_dict(
      state_dict, expected, flax_path, convert=_to_flax,
      what='the checkpoint is not an OpenAI/open_clip ViT CLIP of this preset',
      skip=lambda key: key in _IGNORED or _tower(key) not in towers)
  return flax.traverse_util.unflatten_dict({path[len(prefix):]: array for path, array in flat.items()})


def infer_clip_config(state_dict: Mapping, act: str) -> dict:
  """A CLIP config (the layout of `CLIP_PRESETS`) read off a state dict's shapes.

  Heads are not stored in weights: width // 64, as in every OpenAI and open_clip
  ViT CLIP (the 'tiny' preset is not inferable; pass it by name).
  """
  shapes = {k: np.shape(v) for k, v in state_dict.items()}

  def shape(key):
    if key not in shapes:
      raise UserError(f'the checkpoint has no {key}; it is not an OpenAI/open_clip ViT CLIP '
                      'state dict.')
    return shapes[key]

  def count(prefix):
    return len({k[len(prefix):].split('.')[0] for k in shapes if k.startswith(prefix)})

  conv = shape('visual.conv1.weight')
  grid = int(round((shape('visual.positional_embedding')[0] - 1)**0.5))
  vision_width, text_width = conv[0], shape('ln_final.weight')[0]
  return dict(
      embed_dim=shape('text_projection')[1], act=act,
      vision=dict(image_size=conv[-1] * grid, patch_size=conv[-1], width=vision_width,
                  layers=count('visual.transformer.resblocks.'), heads=vision_width // 64),
      text=dict(context_length=shape('positional_embedding')[0],
                vocab_size=shape('token_embedding.weight')[0], width=text_width,
                heads=text_width // 64, layers=count('transformer.resblocks.')))


def load_clip_checkpoint(path: str, preset: str | Mapping | None = None, *, act: str | None = None):
  """(config, params) of a CLIP checkpoint file; `clip_model(config)` builds its module.

  Args:
    path: .pt / .bin / .safetensors state dict, or an OpenAI TorchScript archive.
    preset: a `CLIP_PRESETS` name or config; default: read off the shapes.
    act: overrides the activation. Without a preset, OpenAI's archives default to
      'quick_gelu'; other files need it stated (weights do not tell).
  """
  state_dict, scripted = pytorch.load_state_dict(path)
  if preset is not None:
    config = clip_lib.clip_config(preset)
    if act is not None:
      config['act'] = act
  else:
    if act is None and not scripted:
      raise UserError(f'{path}: the activation is not stored in CLIP weights; pass '
                      "act='quick_gelu' for OpenAI-trained weights or act='gelu' for open_clip "
                      'trainings of plain (non -quickgelu) models, or a preset.')
    config = infer_clip_config(state_dict, act or 'quick_gelu')
  return config, convert_clip_state_dict(state_dict, clip_lib.clip_model(config))
