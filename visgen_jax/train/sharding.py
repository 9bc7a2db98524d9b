"""Device mesh from the config, and where every array lives on it.

The batch is split over the ('data', 'fsdp') axes. Parameters follow the
config's regex rules; the rest are split over 'fsdp' on their largest dimension
that the axis divides (replicated when fsdp == 1, which is plain data parallel).
"""

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from visgen_jax.errors import UserError

AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_config[a]) for a in AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  known = math.prod(s for s in sizes if s != -1)
  bad = (len(free) > 1 or any(s == 0 or s < -1 for s in sizes)
         or (free and len(devices) % known) or (not free and known != len(devices)))
  if bad:
    shown = ', '.join(f'{a}={s}' for a, s in zip(AXES, sizes))
    raise UserError(f'config.mesh: {shown} does not fit the {len(devices)} devices present '
                    f'(the sizes must multiply to {len(devices)}; at most one may be -1).')
  if free:
    sizes[free[0]] = len(devices) // known
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_name(path) -> str:
  """A parameter's tree path as 'unet/input_blocks_0/kernel' (what sharding rules and config.frozen match)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _parse_spec(text: str, ndim: int, name: str):
  axes = [a.strip() or None for a in text.split(',')] if text else []
  for a in axes:
    if a is not None and a not in AXES:
      raise UserError(f'config.sharding_rules: axis {a!r} for {name} is not one of {", ".join(AXES)}.')
  if len(axes) > ndim:
    raise UserError(f'config.sharding_rules: {text!r} names {len(axes)} dimensions but {name} has {ndim}.')
  return P(*axes, *([None] * (ndim - len(axes))))


def _fsdp_spec(shape, fsdp_size: int):
  """Splits the largest dimension the fsdp axis divides; small arrays stay whole."""
  if fsdp_size == 1 or math.prod(shape) < 2 ** 14:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh, rules=()):
  """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def place(path, leaf):
    shape = getattr(leaf, 'shape', ())
    name = path_name(path)
    for pattern, spec in compiled:
      if pattern.search(name):
        return NamedSharding(mesh, _parse_spec(spec, len(shape), name))
    return NamedSharding(mesh, _fsdp_spec(shape, mesh.shape['fsdp']))

  return jax.tree_util.tree_map_with_path(place, tree)
