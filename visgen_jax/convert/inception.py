"""pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`) → the params of
`visgen_jax.models.inception.InceptionV3`.

The Flax modules carry torchvision's names, so a key converts by splitting it at the dots:
'Mixed_6d.branch1x1.conv.weight' → Mixed_6d/branch1x1/kernel (OIHW → HWIO), '….bn.weight' /
'bias' / 'running_mean' / 'running_var' → scale / bias / mean / var of the same ConvBN,
'fc.weight' → fc/kernel ([out, in] → [in, out]). BatchNorm's num_batches_tracked counters are
not weights and are skipped.

`load_inception(path)` takes the .pth (read with torch) or a directory written by
`python -m visgen_jax.convert --kind=inception` (no torch needed).
"""

import os
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.convert import pytorch
from visgen_jax.errors import UserError
from visgen_jax.models.inception import InceptionV3

WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
_BN = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
_SKIPPED = 'num_batches_tracked'


def abstract_params():
  """Shapes of InceptionV3's params, without allocating them."""
  init = lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3)))['params']
  return jax.eval_shape(init)


def flax_path(key: str) -> tuple[str, ...] | None:
  """The param path of a pytorch-fid key, or None when the key is not one of its kinds."""
  *modules, layer, name = key.split('.')
  if key in ('fc.weight', 'fc.bias'):
    return ('fc', 'kernel' if name == 'weight' else 'bias')
  if not modules or layer not in ('conv', 'bn'):
    return None
  if layer == 'conv':
    return (*modules, 'kernel') if name == 'weight' else None
  return (*modules, _BN[name]) if name in _BN else None


def convert_inception_state_dict(state_dict: Mapping, source: str = 'the state dict') -> dict:
  """InceptionV3 params (float32 numpy) from pytorch-fid's state dict (name → array).

  Raises UserError (one sentence naming `source`) when the keys are not the FID Inception's:
  keys with no param, params with no key, or a shape that differs.
  """
  if 'Mixed_6d.branch1x1.conv.weight' not in state_dict:
    raise UserError(f'{source} is not the FID Inception (it has no Mixed_6d.branch1x1.conv.weight); '
                    f'give pytorch-fid\'s {WEIGHTS_FILE}.')
  flat, _ = pytorch.map_state_dict(
      state_dict, flax.traverse_util.flatten_dict(abstract_params()), flax_path,
      what=f'{source} is not the FID Inception of pytorch-fid ({WEIGHTS_FILE})', skip=lambda k: k.endswith(_SKIPPED))
  return flax.traverse_util.unflatten_dict(flat)


def load_inception(path: str, where: str = '--inception') -> dict:
  """InceptionV3 params from pytorch-fid's .pth file or a directory converted from it.

  `where` names the setting that gave the path (e.g. config.evals.fid.inception) in errors.
  """
  if not path:
    raise UserError(f'{where} is not set; give the path of pytorch-fid\'s {WEIGHTS_FILE} (or of '
                    'its conversion by python -m visgen_jax.convert --kind=inception).')
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    try:
      restored = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    except (ValueError, FileNotFoundError, KeyError) as e:
      raise UserError(f'{where}={path!r} is a directory but not a converted FID Inception '
                      f'({type(e).__name__}); convert {WEIGHTS_FILE} with python -m '
                      'visgen_jax.convert --kind=inception.') from None
    return _from_converted(flax.traverse_util.flatten_dict(restored), f'{where}={path!r}')
  if not os.path.isfile(path):
    raise UserError(f'{where}={path!r}: no such file; give the path of pytorch-fid\'s {WEIGHTS_FILE}.')
  return convert_inception_state_dict(pytorch.load_state_dict(path)[0], f'{where}={path!r}')


def _from_converted(flat: dict, source: str) -> dict:
  """Params restored from a converted directory, checked against InceptionV3's shapes."""
  expected = flax.traverse_util.flatten_dict(abstract_params())
  if flat.keys() != expected.keys() or any(np.shape(flat[k]) != expected[k].shape for k in flat):
    raise UserError(f'{source} does not hold converted FID Inception params; convert '
                    f'{WEIGHTS_FILE} with python -m visgen_jax.convert --kind=inception.')
  return flax.traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})
