"""One side of a comparison from a path: a folder of images, a dataset made by data_prep/, an
`.npz` batch or an `.npz` of statistics (the ADM evaluator's layouts).

  .npz  'arr_0': uint8 images [N, H, W, 3] (a sample or reference batch), read in place when
        the file is not compressed; 'mu', 'sigma' (pool3, [2048], [2048, 2048]) and optionally
        'mu_s', 'sigma_s' (spatial, [2023], [2023, 2023]): statistics, used instead of those of
        arr_0 when present, as the ADM evaluator does. A file may hold both.
  folder  image files (png, jpg, webp, ...) under it, sorted by path, all of one size; a
        'grid.png' at its top (the grid the sample commands write beside the samples) is left
        out.
  dataset  a directory made by data_prep/build_image_dataset.py: its stored images.
"""

import abc
import dataclasses
import os
import struct
import zipfile

import numpy as np
from PIL import Image

from visgen_jax import image_io
from visgen_jax.data import folder
from visgen_jax.errors import UserError
from visgen_jax.fid.metrics import Measured, Statistics
from visgen_jax.models.inception import POOL_DIM, SPATIAL_DIM

SAMPLE_GRID = 'grid.png'
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class Images(abc.ABC):
  """uint8 images [count, H, W, 3] of one size, read by index range."""

  @property
  @abc.abstractmethod
  def count(self) -> int:
    """The number of images."""

  @abc.abstractmethod
  def read(self, start: int, stop: int) -> np.ndarray:
    """Images start, ..., stop - 1."""


@dataclasses.dataclass(frozen=True)
class ArrayImages(Images):
  array: np.ndarray  # [N, H, W, 3] uint8, in memory or memory-mapped

  @property
  def count(self):
    return len(self.array)

  def read(self, start, stop):
    return np.asarray(self.array[start:stop])


@dataclasses.dataclass(frozen=True)
class FileImages(Images):
  paths: tuple[str, ...]

  @property
  def count(self):
    return len(self.paths)

  def read(self, start, stop):
    return np.stack([np.asarray(image_io.load_rgb(p)[0]) for p in self.paths[start:stop]])


@dataclasses.dataclass(frozen=True)
class RecordImages(Images):
  """The 'image' of dataset records, each passed through `transform` (record → example) if set."""
  records: object
  transform: object = None

  @property
  def count(self):
    return len(self.records)

  def read(self, start, stop):
    examples = (self.records[i] for i in range(start, stop))
    if self.transform is not None:
      examples = map(self.transform, examples)
    return np.stack([e['image'] for e in examples])


@dataclasses.dataclass(frozen=True)
class Input:
  """A side as given: its images (None for a statistics file) and the file's own statistics
  (None unless it has mu / sigma; spatial None unless it has mu_s / sigma_s)."""
  images: Images | None
  pool: Statistics | None = None
  spatial: Statistics | None = None


def _stored_npy(path: str, name: str):
  """The array `name` of an uncompressed .npz, memory-mapped; None if the member is compressed."""
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(f'{name}.npy')
  if info.compress_type != zipfile.ZIP_STORED:
    return None
  with open(path, 'rb') as f:
    f.seek(info.header_offset)
    local_header = f.read(30)
    name_length, extra_length = struct.unpack('<HH', local_header[26:30])
    f.seek(info.header_offset + 30 + name_length + extra_length)
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(f)
    offset = f.tell()
  return np.memmap(path, dtype, 'r', offset, shape, 'F' if fortran_order else 'C')


def _statistics(arrays, mean_key, cov_key, dim, source):
  mu, sigma = np.asarray(arrays[mean_key], np.float64), np.asarray(arrays[cov_key], np.float64)
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise UserError(f'{source} has {mean_key} of shape {mu.shape} and {cov_key} of shape '
                    f'{sigma.shape}; the FID Inception\'s need ({dim},) and ({dim}, {dim}).')
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise UserError(f'{source} has {mean_key} or {cov_key} values that are not finite.')
  return Statistics(mu, sigma)


def _open_npz(path: str, source: str) -> Input:
  try:
    arrays = np.load(path)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise UserError(f'{source} could not be read as an .npz file ({e}).') from None
  keys = set(arrays.files)
  if 'arr_0' not in keys and 'mu' not in keys:
    raise UserError(f'{source} has neither images (arr_0) nor statistics (mu, sigma); it holds '
                    f'{", ".join(sorted(keys)) or "nothing"}.')
  pool = spatial = images = None
  if 'mu' in keys:
    if 'sigma' not in keys or ('mu_s' in keys) != ('sigma_s' in keys):
      raise UserError(f'{source} has statistics without their pair: it needs mu with sigma, and '
                      'mu_s with sigma_s.')
    pool = _statistics(arrays, 'mu', 'sigma', POOL_DIM, source)
    if 'mu_s' in keys:
      spatial = _statistics(arrays, 'mu_s', 'sigma_s', SPATIAL_DIM, source)
  if 'arr_0' in keys:
    batch = _stored_npy(path, 'arr_0')
    batch = arrays['arr_0'] if batch is None else batch
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
      raise UserError(f'{source} has arr_0 of dtype {batch.dtype} and shape {batch.shape}; images '
                      'must be uint8 [N, H, W, 3].')
    images = ArrayImages(batch)
  return Input(images, pool, spatial)


def _oriented_size(path: str, source: str) -> tuple[int, int]:
  """(width, height) of an image file as read (EXIF orientation applied), from its header."""
  try:
    with Image.open(path) as image:
      width, height = image.size
      if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
        width, height = height, width
  except (OSError, Image.DecompressionBombError) as e:
    raise UserError(f'{source}: {path} is not a readable image ({e}).') from None
  return width, height


def _open_folder(path: str, source: str) -> Input:
  names = [n for n in folder.list_images(path)[0] if n != SAMPLE_GRID]
  if not names:
    raise UserError(f'{source} holds no image files ({", ".join(folder.IMAGE_EXTENSIONS)}).')
  paths = tuple(os.path.join(path, n) for n in names)
  first = _oriented_size(paths[0], source)
  for p, name in zip(paths[1:], names[1:]):
    size = _oriented_size(p, source)
    if size != first:
      raise UserError(f'{source} mixes image sizes: {names[0]} is {first[0]}x{first[1]} but {name} '
                      f'is {size[0]}x{size[1]}; resize the images to one size first.')
  return Input(FileImages(paths))


def _open_dataset(path: str) -> Input:
  import ml_collections  # pylint: disable=g-import-not-at-top
  from visgen_jax.data import images as image_sources  # pylint: disable=g-import-not-at-top
  records, _ = image_sources.FolderImages('folder').open(ml_collections.ConfigDict({'path': path}))
  return Input(RecordImages(records))


def open_input(path: str, where: str) -> Input:
  """The side at `path`; `where` names the argument or setting that gave it, for errors."""
  source = f'{where}={path!r}'
  full = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(full):
    side = _open_dataset(full) if folder.is_dataset_dir(full) else _open_folder(full, source)
  elif os.path.isfile(full) and full.endswith('.npz'):
    side = _open_npz(full, source)
  else:
    raise UserError(f'{source} is neither an image folder, a dataset directory nor an .npz file.')
  if side.pool is None and side.images.count < 2:
    raise UserError(f'{source} holds {side.images.count} image; FID needs at least 2.')
  return side


def save_statistics(path: str, measured: Measured):
  """mu, sigma, mu_s, sigma_s (the ADM reference layout) as an .npz at `path`, from process 0."""
  arrays = {'mu': measured.pool.mu, 'sigma': measured.pool.sigma}
  if measured.spatial is not None:
    arrays.update(mu_s=measured.spatial.mu, sigma_s=measured.spatial.sigma)
  if image_io.is_writer():
    def write(tmp):
      with open(tmp, 'wb') as f:  # a file object: np.savez would add '.npz' to a name
        np.savez(f, **arrays)
    image_io.write_atomically(path, write)
