"""guided_diffusion `UNetModel` state dict → `ADMUNet` params.

Every PyTorch key is mapped by name through `adm_layout` (which knows where the
module has attention, resampling blocks, ...), its array is transposed to the
Flax layout (OIHW → HWIO, Linear / 1x1 Conv1d [out, in] → [in, out]), and its
shape is checked against the module. Keys with no counterpart are reported;
params with no key are an error.
"""

from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.convert import pytorch
from visgen_jax.errors import UserError
from visgen_jax.models.adm_unet import ADMUNet, adm_layout

# guided_diffusion submodule path → Flax submodule name, per layer kind.
_RES = {'in_layers.0': 'in_norm', 'in_layers.2': 'in_conv', 'emb_layers.1': 'emb_proj',
        'cond_emb_layers.1': 'code_proj', 'out_layers.0': 'out_norm', 'out_layers.3': 'out_conv',
        'skip_connection': 'skip'}
_ATTN = {'norm': 'norm', 'qkv': 'qkv', 'proj_out': 'proj_out'}
_SUBMODULES = {'res': _RES, 'attn': _ATTN, 'down': {'op': 'conv'}, 'up': {'conv': 'conv'}}
_TOP = {'time_embed.0': ('time_embed_0',), 'time_embed.2': ('time_embed_1',), 'label_emb': ('label_emb',),
        'out.0': ('out_norm',), 'out.2': ('out_conv',)}


def _module_map(module: ADMUNet) -> dict[str, tuple[str, ...]]:
  """guided_diffusion module path (e.g. 'input_blocks.1.0.in_layers.2') → Flax module path."""
  layout = adm_layout(module)
  mapping = dict(_TOP)
  for spec in [s for block in layout.input_blocks for s in block] + list(layout.middle_block) + [
      s for block in layout.output_blocks for s in block]:
    if spec.kind == 'conv_in':
      mapping[spec.torch] = (spec.name,)
    else:
      for sub, flax_sub in _SUBMODULES[spec.kind].items():
        mapping[f'{spec.torch}.{sub}'] = (spec.name, flax_sub)
  return mapping


def abstract_params(module: ADMUNet):
  """Shapes/dtypes of `module`'s params, without allocating them."""
  side = 2 ** (len(module.channel_mult) - 1)
  x = jax.ShapeDtypeStruct((1, side, side, module.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32) if module.num_classes else None
  code = jax.ShapeDtypeStruct((1, module.code_dim), jnp.float32) if module.code_dim else None
  return jax.eval_shape(lambda *args: module.init(jax.random.key(0), *args), x, t, y, code)['params']


def _convert(state_dict: Mapping[str, np.ndarray], module: ADMUNet, ignore_unmapped: bool):
  """(params, keys with no counterpart)."""
  module_map = _module_map(module)
  expected = flax.traverse_util.flatten_dict(abstract_params(module))

  def flax_path(key):
    torch_module, _, leaf = key.rpartition('.')
    path = module_map.get(torch_module)
    if path is None or leaf not in ('weight', 'bias'):
      return None
    if leaf == 'bias':
      return path + ('bias',)
    return next((path + (p,) for p in ('kernel', 'scale', 'embedding') if path + (p,) in expected), None)

  flat, unmapped = pytorch.map_state_dict(
      state_dict, expected, flax_path, allow_unmapped=ignore_unmapped,
      what='the checkpoint is not a guided_diffusion UNetModel of this model config')
  return flax.traverse_util.unflatten_dict(flat), unmapped


def convert_unet_state_dict(state_dict: Mapping[str, np.ndarray], module: ADMUNet, *,
                            ignore_unmapped: bool = False):
  """Flax params (float32 numpy) for `module` from a guided_diffusion UNetModel state dict.

  Raises UserError when a param has no key or a shape differs, and when a key has no
  counterpart unless `ignore_unmapped`.
  """
  return _convert(state_dict, module, ignore_unmapped)[0]


def load_guided_diffusion_checkpoint(path: str, module: ADMUNet):
  """(params, unmapped_keys) from a guided_diffusion .pt file for `module`."""
  return _convert(pytorch.load_state_dict(path)[0], module, ignore_unmapped=True)


def infer_unet_config(state_dict: Mapping[str, np.ndarray], image_size: int) -> dict:
  """The ADMUNet fields that a guided_diffusion state dict determines.

  Attention heads (num_heads, num_head_channels, num_heads_upsample,
  use_new_attention_order) and dropout leave no trace in the weights and keep
  their defaults; `image_size` places the attention layers in pixels.
  """
  shapes = {k: np.shape(v) for k, v in state_dict.items()}

  def shape(key):
    if key not in shapes:
      raise UserError(f'the checkpoint has no {key}; it is not a guided_diffusion UNetModel state dict.')
    return shapes[key]

  def up_layer(i):
    """Keys (minus prefix) of output block i's upsampling layer, or None."""
    layers = {}
    for key in shapes:
      if key.startswith(f'output_blocks.{i}.'):
        j, _, tail = key[len(f'output_blocks.{i}.'):].partition('.')
        layers.setdefault(int(j), set()).add(tail)
    # Layer 0 is the block's ResBlock; an upsampler is an Upsample conv or a ResBlock after it.
    return next((tails for j, tails in layers.items()
                 if j > 0 and ('conv.weight' in tails or 'in_layers.0.weight' in tails)), None)

  model_channels = shape('time_embed.0.weight')[1]
  emb_width = shape('output_blocks.0.0.emb_layers.1.weight')[0]
  n_out = 1 + max(int(k.split('.')[1]) for k in shapes if k.startswith('output_blocks.'))
  ups = [i for i in range(n_out) if up_layer(i)]
  # Output blocks run num_res_blocks + 1 per level; the deepest level's last one upsamples first.
  num_res_blocks = ups[0] if ups else n_out - 1
  num_levels = n_out // (num_res_blocks + 1)

  channel_mult, attention_ds = [], []
  for level in range(num_levels):
    first = 1 + level * (num_res_blocks + 1)
    m = shape(f'input_blocks.{first}.0.out_layers.0.weight')[0] / model_channels
    channel_mult.append(int(m) if m.is_integer() else m)
    if f'input_blocks.{first}.1.qkv.weight' in shapes:
      attention_ds.append(2**level)
  for ds in attention_ds:
    if image_size % ds:
      raise UserError(f'image_size={image_size} is not divisible by the attention downsample rate {ds} '
                      'found in the checkpoint.')

  code_keys = [k for k in shapes if k.endswith('.cond_emb_layers.1.weight')]
  return dict(
      image_size=image_size,
      in_channels=shape('input_blocks.0.0.weight')[1],
      model_channels=model_channels,
      out_channels=shape('out.2.weight')[0],
      num_res_blocks=num_res_blocks,
      attention_resolutions=tuple(image_size // ds for ds in attention_ds),
      channel_mult=tuple(channel_mult),
      num_classes=shapes['label_emb.weight'][0] if 'label_emb.weight' in shapes else None,
      use_scale_shift_norm=emb_width == 2 * shape('output_blocks.0.0.out_layers.0.weight')[0],
      resblock_updown=bool(ups) and 'in_layers.0.weight' in up_layer(ups[0]),
      code_dim=shapes[code_keys[0]][1] if code_keys else None,
  )
