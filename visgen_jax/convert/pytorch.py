"""What every PyTorch → Flax converter shares: reading a checkpoint file safely, a weight's layout
change, and the mapping of a state dict's keys onto a module's params with every problem told in
one sentence."""

import os
import re
import zipfile
from collections.abc import Callable, Mapping

import numpy as np

from visgen_jax.errors import UserError

Path = tuple[str, ...]


def _is_torchscript(path: str) -> bool:
  """TorchScript archives are zips holding constants.pkl beside the pickled data."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(name.endswith('/constants.pkl') for name in archive.namelist())


def _read_safetensors(path: str) -> Mapping:
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f'reading {path} needs safetensors; `pip install safetensors`.') from None
  try:
    return load_file(path)
  except Exception as e:  # safetensors raises its own SafetensorError on corrupt files
    raise UserError(f'{path} could not be read as a safetensors file ({e}).') from None


def _read_torch(path: str, scripted: bool) -> Mapping:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f'reading the PyTorch checkpoint {path} needs torch; install it with '
                    '`pip install torch --index-url https://download.pytorch.org/whl/cpu`.') from None
  if scripted:
    return torch.jit.load(path, map_location='cpu').state_dict()
  numpy_types = [np._core.multiarray._reconstruct, np.ndarray, np.dtype,  # detectron2 stores numpy arrays
                 *{type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int64, np.int32, np.uint8)}]
  try:
    with torch.serialization.safe_globals(numpy_types):
      return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ValueError, ... for what it refuses
    found = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
    what = f'it pickles {found.group(1)}' if found else f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
    raise UserError(f'{path} cannot be read with torch.load(weights_only=True) ({what}); this project never '
                    'unpickles code: if you trust the file, keep only its weights, e.g. torch.save(torch.load('
                    'PATH, weights_only=False)["model"], "weights.pth"), and convert that.') from None


def load_state_dict(path: str) -> tuple[dict[str, np.ndarray], bool]:
  """(name → float32 numpy array, whether the file is a TorchScript archive) of a weights file.

  .safetensors are read with `safetensors`, TorchScript archives (OpenAI's CLIP) with torch.jit,
  anything else (.pt, .pth, .bin) with torch.load(weights_only=True) allowing numpy arrays: code
  is never unpickled. Unwraps {'state_dict': ...} and {'model': ...} (open_clip, detectron2) and
  a 'module.' prefix; entries that are not arrays (counters, iteration numbers) are left out.
  """
  if not os.path.isfile(path):
    raise UserError(f'checkpoint {path} does not exist.')
  scripted = not path.endswith('.safetensors') and _is_torchscript(path)
  state = _read_safetensors(path) if path.endswith('.safetensors') else _read_torch(path, scripted)
  for wrapper in ('state_dict', 'model'):
    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
  if not isinstance(state, Mapping):
    raise UserError(f'{path} holds a {type(state).__name__}, not a state dict (names → weights).')
  arrays = {k: np.asarray(v.detach().float().numpy() if hasattr(v, 'detach') else v, np.float32)
            for k, v in state.items() if hasattr(v, 'detach') or isinstance(v, np.ndarray)}
  if not arrays:
    raise UserError(f'{path} holds no weights (tensors or numpy arrays).')
  if all(k.startswith('module.') for k in arrays):  # saved from a DataParallel wrapper
    arrays = {k[len('module.'):]: v for k, v in arrays.items()}
  return arrays, scripted


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
