"""Mask2Former proposal networks (detectron2 format) and torchvision ResNets → this project's params.

A detectron2 Mask2Former checkpoint (MaskCLIP's released `mask_proposal_network.pth`) holds
`{'model': {name: tensor or numpy array}, ...}` with `backbone.*` (detectron2's ResNet),
`sem_seg_head.pixel_decoder.*` and `sem_seg_head.predictor.*`; it becomes the params of
visgen_jax.models.mask2former.Mask2Former by that module's naming rules (its docstring):
drop `sem_seg_head.`, `.N` → `_N`, other dots → `/`; `weight` → `kernel` (Conv OIHW → HWIO,
Linear [out, in] → [in, out]), `scale` (norms) or `embedding` (nn.Embedding), whichever the
module has there; nn.MultiheadAttention's fused `in_proj_*` split in thirds into
q_proj / k_proj / v_proj. detectron2's backbone names are first renamed to torchvision's
(`stem.conv1[.norm]` → conv1 / bn1, `resK.N.convM[.norm]` → layer{K-1}_N/convM (bnM),
`shortcut[.norm]` → downsample_0 (downsample_1)); its FrozenBatchNorm `weight`, `bias`,
`running_mean`, `running_var` are the frozen norms' scale, bias, mean, var.

MaskCLIP's released network has no class head (its decoder leaves `class_embed` out and its
inference feeds all Q final masks to CLIP): without `predictor.class_embed.*` keys the head is
zero-filled with one class, so every query scores 0.5 and proposals are all queries in query
order, as MaskCLIP uses them.

A torchvision ResNet state dict (`resnet50-*.pth`) becomes {'backbone': ...} alone (its `fc` is
not part of the network and is listed as unmapped): a start for training the proposal network.

The architecture is read off the weights (queries, widths, layer counts, backbone depth);
attention heads are not stored in weights and default to the paper's 8. Files are read with
torch.load(weights_only=True), allowing numpy arrays besides tensors; anything else pickled
inside (e.g. a training run's scheduler objects) is refused with a sentence saying how to keep
only the weights. Checkpoint keys with no counterpart are returned (and listed by the command);
parameters no key gives are an error listing them.
"""

import re
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.convert import pytorch
from visgen_jax.errors import UserError
from visgen_jax.models import resnet
from visgen_jax.models.mask2former import Mask2Former

HEAD_PREFIX = 'sem_seg_head.'
REQUIRED_PREFIXES = ('backbone.', 'sem_seg_head.pixel_decoder.', 'sem_seg_head.predictor.')
_NORM_LEAVES = {'running_mean': 'mean', 'running_var': 'var'}  # FrozenBN / BatchNorm statistics
CLASS_HEAD = 'predictor/class_embed/'
_EMBEDDINGS = ('query_feat', 'query_embed', 'level_embed')  # the predictor's nn.Embedding modules
_D2_BACKBONE = ((re.compile(r'stem\.conv1\.norm\.'), 'bn1.'), (re.compile(r'stem\.conv1\.'), 'conv1.'),
                (re.compile(r'res(\d)\.(\d+)\.conv(\d)\.norm\.'), None),
                (re.compile(r'res(\d)\.(\d+)\.conv(\d)\.'), None),
                (re.compile(r'res(\d)\.(\d+)\.shortcut\.norm\.'), None),
                (re.compile(r'res(\d)\.(\d+)\.shortcut\.'), None))


def _torchvision_backbone_name(key: str) -> str:
  """detectron2 ResNet key (without 'backbone.') → torchvision's name for it."""
  for pattern, fixed in _D2_BACKBONE:
    match = pattern.match(key)
    if match:
      if fixed:
        return fixed + key[match.end():]
      stage, block = int(match.group(1)) - 1, match.group(2)
      text = match.group(0)
      if 'shortcut' in text:
        inner = 'downsample.1.' if 'norm' in text else 'downsample.0.'
      else:
        inner = (f'bn{match.group(3)}.' if 'norm' in text else f'conv{match.group(3)}.')
      return f'layer{stage}.{block}.{inner}{key[match.end():]}'
  return key


def _module_path(name: str) -> tuple[str, ...]:
  """'a.b.0.c' → ('a', 'b_0', 'c'): an index joins the name before it."""
  return tuple(re.sub(r'\.(\d+)(?=\.|$)', r'_\1', name).split('.'))


def _flax_entries(key: str, array: np.ndarray) -> list[tuple[tuple[str, ...], np.ndarray]] | None:
  """(Flax param path, array in Flax layout) pairs of one checkpoint key; None if it names no
  parameter (torch's BatchNorm counter)."""
  if key.startswith('backbone.'):
    key = 'backbone.' + _torchvision_backbone_name(key[len('backbone.'):])
  elif key.startswith(HEAD_PREFIX):
    key = key[len(HEAD_PREFIX):]
  if key == 'pixel_decoder.transformer.level_embed':  # an nn.Parameter, not a module's leaf
    return [(('pixel_decoder', 'transformer', 'level_embed'), array)]
  module, _, leaf = key.rpartition('.')
  path = _module_path(module)
  if leaf == 'num_batches_tracked':
    return None
  if leaf in ('in_proj_weight', 'in_proj_bias'):  # fused [q; k; v] rows
    name = 'kernel' if leaf == 'in_proj_weight' else 'bias'
    return [(path + (f'{part}_proj', name), third.T if name == 'kernel' else third)
            for part, third in zip('qkv', np.split(array, 3, axis=0))]
  if leaf != 'weight':
    return [(path + (_NORM_LEAVES.get(leaf, leaf),), array)]
  if path[-1] in _EMBEDDINGS:
    return [(path + ('embedding',), array)]
  if array.ndim == 1:  # a norm
    return [(path + ('scale',), array)]
  return [(path + ('kernel',), pytorch.to_flax(array, ('kernel',)))]  # Conv2d or Linear


def _convert(state_dict: Mapping[str, np.ndarray]):
  """({Flax path tuple: array}, {Flax path tuple: the key it came from})."""
  flat, origin = {}, {}
  for key, value in state_dict.items():
    for path, array in _flax_entries(key, value) or ():
      flat[path], origin[path] = array, key
  return flat, origin


def infer_fields(flat_params: Mapping[str, np.ndarray], num_heads: int = Mask2Former.num_heads) -> dict:
  """Mask2Former fields read off '/'-joined param names → arrays (heads are not in weights);
  KeyError names a parameter it needs and does not find."""
  shape = lambda name: np.shape(flat_params[name])
  count = lambda pattern: len({m.group(1) for n in flat_params for m in [re.match(pattern, n)] if m})
  stage_sizes = tuple(count(rf'backbone/layer{k}_(\d+)/') for k in range(1, 5))
  depth = next((d for d, (_, sizes) in resnet.BLOCKS.items() if sizes == stage_sizes), None)
  if depth is None:
    raise UserError(f'the backbone has {stage_sizes} blocks per stage, not a ResNet of depth '
                    f'{", ".join(map(str, resnet.BLOCKS))}.')
  enc = 'pixel_decoder/transformer/encoder/layers_0/'
  weights_per_query = shape(enc + 'self_attn/attention_weights/kernel')[1]
  return dict(
      num_classes=shape('predictor/class_embed/kernel')[1] - 1,
      num_queries=shape('predictor/query_feat/embedding')[0],
      hidden_dim=shape('predictor/query_feat/embedding')[1],
      mask_dim=shape('pixel_decoder/mask_features/kernel')[-1], num_heads=num_heads,
      ffn_dim=shape('predictor/transformer_ffn_layers_0/linear1/kernel')[1],
      dec_layers=count(r'predictor/transformer_ffn_layers_(\d+)/'),
      enc_layers=count(r'pixel_decoder/transformer/encoder/layers_(\d+)/'),
      enc_ffn_dim=shape(enc + 'linear1/kernel')[1],
      enc_points=weights_per_query // (num_heads * shape('pixel_decoder/transformer/level_embed')[0]),
      backbone_depth=depth, backbone_width=shape('backbone/conv1/kernel')[-1])


def _abstract(module) -> dict:
  """{Flax path tuple: ShapeDtypeStruct} of a module's params, without allocating them."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))['params']
  return flax.traverse_util.flatten_dict(shapes)


def _checked(flat, origin, expected, what: str):
  """(params, unmapped keys): `flat` restricted to `expected`, shapes checked; UserError listing
  the parameters no key gives."""
  missing = sorted('/'.join(p) for p in expected if p not in flat)
  if missing:
    raise UserError(f'{what}: it has no value for {len(missing)} parameters '
                    f'({", ".join(missing[:6])}{", ..." if len(missing) > 6 else ""}).')
  for path, want in expected.items():
    if flat[path].shape != want.shape:
      raise UserError(f'{what}: key {origin[path]} becomes {"/".join(path)} of shape {flat[path].shape}, but '
                      f'the network has {want.shape} there.')
  unmapped = sorted({key for path, key in origin.items() if path not in expected})
  return flax.traverse_util.unflatten_dict({p: flat[p] for p in expected}), unmapped


def network_from_params(flat: Mapping[str, np.ndarray], num_heads: int = Mask2Former.num_heads,
                        where: str = 'the checkpoint', origin: Mapping | None = None):
  """(Mask2Former fields, params, unmapped names) from '/'-joined param names → arrays, the
  architecture read off them; UserError (one sentence listing what is missing) when they are
  not a proposal network's. `origin` maps a name to the checkpoint key it came from."""
  what = f'{where} is not a Mask2Former proposal network'
  absent = [f'{part}/*' for part in ('backbone', 'pixel_decoder', 'predictor')
            if not any(name.startswith(part + '/') for name in flat)]
  if absent:
    raise UserError(f'{what}: it has no {", ".join(absent)} parameters (it has e.g. '
                    f'{", ".join(sorted(flat)[:3])}).')
  try:
    fields = infer_fields(flat, num_heads)
  except KeyError as e:
    raise UserError(f'{what}: it has no value for {e.args[0]}.') from None
  by_path = {tuple(name.split('/')): array for name, array in flat.items()}
  keys = {tuple(name.split('/')): (origin or {}).get(name, name) for name in flat}
  params, unmapped = _checked(by_path, keys, _abstract(Mask2Former(**fields)), what)
  return fields, params, unmapped


def convert_state_dict(state_dict: Mapping[str, np.ndarray], num_heads: int = Mask2Former.num_heads,
                       where: str = 'the checkpoint'):
  """(Mask2Former fields, params, unmapped keys) of a detectron2 Mask2Former state dict."""
  absent = [p + '*' for p in REQUIRED_PREFIXES if not any(k.startswith(p) for k in state_dict)]
  if absent:
    raise UserError(f'{where} is not a Mask2Former proposal network: it has no {", ".join(absent)} keys '
                    f'(it has e.g. {", ".join(sorted(state_dict)[:3])}).')
  flat, origin = _convert(state_dict)
  names = {'/'.join(p): a for p, a in flat.items()}
  if not has_class_head(state_dict):
    hidden = np.shape(names.get('predictor/query_feat/embedding', (0, 0)))[-1]
    names.update({CLASS_HEAD + 'kernel': np.zeros((hidden, 2), np.float32),
                  CLASS_HEAD + 'bias': np.zeros((2,), np.float32)})
  return network_from_params(names, num_heads, where, {'/'.join(p): k for p, k in origin.items()})


def has_class_head(state_dict: Mapping) -> bool:
  return any(k.startswith('sem_seg_head.predictor.class_embed.') for k in state_dict)


def is_torchvision_resnet(state_dict: Mapping) -> bool:
  return 'conv1.weight' in state_dict and 'layer1.0.conv1.weight' in state_dict


def convert_torchvision_resnet(state_dict: Mapping[str, np.ndarray], where: str = 'the checkpoint'):
  """({'backbone': params}, unmapped keys) of a torchvision ResNet state dict, depth and width
  read off its keys; every backbone parameter must be given."""
  blocks = tuple(len({k.split('.')[1] for k in state_dict if k.startswith(f'layer{s}.')}) for s in range(1, 5))
  depth = next((d for d, (_, sizes) in resnet.BLOCKS.items() if sizes == blocks), None)
  if depth is None:
    raise UserError(f'{where}: a ResNet with {blocks} blocks per stage; the backbone is built for depths '
                    f'{", ".join(map(str, resnet.BLOCKS))}.')
  backbone = resnet.ResNet(None, depth, int(np.shape(state_dict['conv1.weight'])[0]), norm='frozen')
  expected = {('backbone',) + p: s for p, s in _abstract(backbone).items()}
  flat, origin = _convert({f'backbone.{k}': v for k, v in state_dict.items()})
  params, unmapped = _checked(flat, origin, expected, f'{where} is not a complete torchvision ResNet-{depth}')
  return params, [k[len('backbone.'):] for k in unmapped]


def is_mask2former(state_dict: Mapping) -> bool:
  return any(k.startswith(HEAD_PREFIX) for k in state_dict)
