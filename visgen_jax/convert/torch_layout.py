"""What every PyTorch → Flax converter shares: a weight's layout change, and the mapping of a
state dict's keys onto a module's params with every problem told in one sentence."""

from collections.abc import Callable, Mapping

import numpy as np

from visgen_jax.errors import UserError

Path = tuple[str, ...]


def to_flax(array: np.ndarray, path: Path) -> np.ndarray:
  """A PyTorch weight in Flax's layout: Conv2d OIHW → HWIO, a 1x1 Conv1d [out, in, 1] and a
  Linear [out, in] → Dense [in, out]; everything else as it is."""
  if path[-1] != 'kernel':
    return array
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 3:
    return array[..., 0].T
  return array.T


def listed(items, limit: int = 6) -> str:
  return ', '.join(items[:limit]) + (', ...' if len(items) > limit else '')


def map_state_dict(state_dict: Mapping, expected: Mapping[Path, object], flax_path: Callable[[str], Path | None],
                   *, what: str, skip: Callable[[str], bool] = lambda key: False,
                   convert: Callable[[np.ndarray, Path], np.ndarray] = to_flax,
                   allow_unmapped: bool = False) -> tuple[dict[Path, np.ndarray], list[str]]:
  """({path: float32 array}, keys with no counterpart): the flat params `expected` ({path:
  shape-bearing leaf}) from a state dict, each key placed by `flax_path` (None: no counterpart)
  and laid out by `convert`.

  Keys with no counterpart (unless `allow_unmapped`), params with no key and shapes that differ
  raise one UserError: '{what}: 2 keys with no counterpart (…); 1 params with no key (…).'
  """
  flat, unmapped, misshapen = {}, [], []
  for key, value in state_dict.items():
    if skip(key):
      continue
    path = flax_path(key)
    if path is None or path not in expected:
      unmapped.append(key)
      continue
    array = convert(np.asarray(value, np.float32), path)
    if array.shape != tuple(expected[path].shape):
      misshapen.append(f'{key} {tuple(np.shape(value))} for {"/".join(path)} {tuple(expected[path].shape)}')
    flat[path] = array
  missing = ['/'.join(p) for p in expected if p not in flat]
  problems = [f'{len(unmapped)} keys with no counterpart ({listed(unmapped)})' if unmapped and not allow_unmapped
              else '',
              f'{len(missing)} params with no key ({listed(missing)})' if missing else '',
              f'{len(misshapen)} keys of another shape ({listed(misshapen, 3)})' if misshapen else '']
  problems = [p for p in problems if p]
  if problems:
    raise UserError(f'{what}: {"; ".join(problems)}.')
  return flat, unmapped
