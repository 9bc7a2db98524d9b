"""Turn a folder of images into a TFDS dataset in ArrayRecord format.

No TensorFlow is needed: images are decoded with Pillow and stored as raw
uint8 tensors, read back with `tfds.builder_from_directory(out).as_data_source`.

The command (primary entry point):

  python data_prep/build_image_dataset.py --src=DIR --out=DIR --resolution=256
  python data_prep/build_image_dataset.py --src=DIR --out=DIR \
      --resolution=512,1024 --crop=random

`--resolution` is one int (square) or `H,W`. Every image is resized so that it
covers H x W while keeping its aspect ratio, then cropped to H x W at the
centre (`--crop=center`, default) or at a seeded random place
(`--crop=random`); `--crop=none` stretches the image to H x W instead.

Each example holds 'image' (uint8 H x W x 3), 'index' (int64, its position in
the dataset, used e.g. by Patch-DM's per-image code table) and 'file_name'
(path relative to the source folder). Grayscale, palette, 16-bit and alpha
images become RGB as `visgen_jax.image_io` reads them (alpha on white). Files that cannot be read
are skipped and listed in the report; they never abort the build.

The dataset is written into a hidden temporary directory beside `out` and
renamed into place only when complete, so an interrupted build never leaves
anything at `out`. `out/build_report.json` records how it was made.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from visgen_jax import image_io
from visgen_jax.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
CROPS = ('center', 'random', 'none')
REPORT_FILE = 'build_report.json'
SPLIT = 'train'


def parse_resolution(value, where: str = 'resolution') -> tuple[int, int]:
  """(H, W) from an int, an (H, W) pair or a string '256' / '512,1024'."""
  if isinstance(value, str):
    value = [v.strip() for v in value.split(',')]
  elif isinstance(value, (int, np.integer)):
    value = [value, value]
  try:
    hw = tuple(int(v) for v in value)
    if len(hw) == 1:
      hw = hw * 2
  except (TypeError, ValueError):
    hw = ()
  if len(hw) != 2 or min(hw) <= 0:
    raise UserError(f'{where}: {value!r} is not a resolution; use one positive '
                    'int (square) or H,W such as 512,1024.')
  return hw


@dataclasses.dataclass
class BuildReport:
  """What `build_image_dataset` did."""
  out_dir: str
  resolution: tuple[int, int]
  crop: str
  num_examples: int = 0
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  ignored_files: int = 0
  # True when `out_dir` already held the dataset (exist_ok).
  reused_existing: bool = False

  def summary(self) -> str:
    h, w = self.resolution
    lines = [f'{self.num_examples} images at {h}x{w} (crop={self.crop}) '
             f'in {self.out_dir}']
    if self.reused_existing:
      lines.append('(this dataset already existed; it was not rebuilt)')
    if self.converted:
      modes = collections.Counter(mode for _, mode in self.converted)
      lines.append('converted to RGB: ' + ', '.join(
          f'{n} from {mode}' for mode, n in sorted(modes.items())))
    if self.ignored_files:
      lines.append(f'ignored {self.ignored_files} files that are not '
                   + '/'.join(e[1:] for e in IMAGE_EXTENSIONS))
    if self.skipped:
      lines.append(f'skipped {len(self.skipped)} unreadable files:')
      lines.extend(f'  {name}: {reason}' for name, reason in self.skipped)
    return '\n'.join(lines)


def list_images(src_dir: str) -> tuple[list[str], int]:
  """Image paths under `src_dir` relative to it, sorted; and #other files.

  Hidden files and directories are left out, which also keeps the temporary
  build directories of an output placed inside `src_dir` out of the listing.
  """
  found, other = [], 0
  for root, dirs, files in os.walk(src_dir):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    for name in files:
      if name.startswith('.'):
        continue
      if name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.relpath(os.path.join(root, name), src_dir))
      else:
        other += 1
  return sorted(p.replace(os.sep, '/') for p in found), other


def _prepare(src_dir: str, name: str, hw: tuple[int, int], crop: str,
             seed: int, ordinal: int):
  """Loads one file: (name, array, original mode) or (name, None, error)."""
  try:
    img, mode = image_io.load_rgb(os.path.join(src_dir, name), draft_hw=hw)
    rng = np.random.default_rng([seed, ordinal])
    return name, image_io.resize_and_crop(img, hw, crop, rng), mode
  except Exception as e:  # pylint: disable=broad-except
    # Any failure to decode one file (corrupt, truncated, bomb, ...) is
    # reported and skipped: one bad file must not sink a long build.
    return name, None, f'{type(e).__name__}: {e}'


def map_in_order(fn: Callable, items: Iterable) -> Iterator:
  """`fn(item)` for each item in order, a bounded window of them in threads.

  Decoding (Pillow, zlib) releases the GIL, so threads overlap it; the window
  keeps memory bounded however long `items` is.
  """
  workers = max(1, min(8, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    window = collections.deque()
    for item in items:
      window.append(pool.submit(fn, item))
      if len(window) > 2 * workers:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()


def _prepared(src_dir, names, hw, crop, seed) -> Iterator[tuple]:
  """`_prepare` over `names` in order."""
  return map_in_order(
      lambda item: _prepare(src_dir, item[1], hw, crop, seed, item[0]),
      enumerate(names))


def _make_builder_class():
  """Defines the TFDS builder; deferred so that importing this is cheap."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images of one folder at one resolution, in file-name order."""
    VERSION = tfds.core.Version('1.0.0')
    # Nothing is downloaded, so there is no checksums file to look up beside
    # the code; and tfds 4.9.10 needs the `importlib_resources` backport to
    # find the code of a builder that lives in a package.
    code_path = None

    def __init__(self, *, src_dir, names, hw, crop, seed, report, **kwargs):
      self._src = (src_dir, names, hw, crop, seed)
      self._report = report
      super().__init__(**kwargs)

    def _info(self):
      h, w = self._src[2]
      return tfds.core.DatasetInfo(
          builder=self,
          description='Images from a local folder (visgen_jax data_prep).',
          features=tfds.features.FeaturesDict({
              # Raw bytes: the default stores every pixel as an int64 in
              # the proto, 10x slower to write and to read.
              'image': tfds.features.Tensor(shape=(h, w, 3), dtype=np.uint8,
                                            encoding='bytes'),
              'index': tfds.features.Tensor(shape=(), dtype=np.int64),
              'file_name': tfds.features.Text(),
          }),
          # Keep generation order so that 'index' is the position on disk.
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
      index = 0
      for name, image, mode in _prepared(*self._src):
        if image is None:
          self._report.skipped.append((name, mode))
          continue
        if mode != 'RGB':
          self._report.converted.append((name, mode))
        yield index, {'image': image, 'index': index, 'file_name': name}
        index += 1
      if index == 0:
        raise UserError(f'src: no readable images in {self._src[0]!r} '
                        f'(all {len(self._src[1])} failed to decode).')
      self._report.num_examples = index

  return ImageFolder


def is_dataset_dir(path: str) -> bool:
  """Whether `path` holds a finished dataset (only ever created by rename)."""
  return os.path.isfile(os.path.join(path, 'dataset_info.json'))


def _reused(report: BuildReport) -> BuildReport:
  """Describes the finished dataset found at `report.out_dir` instead."""
  with open(os.path.join(report.out_dir, REPORT_FILE)) as f:
    existing = json.load(f)
  report.num_examples = existing['num_examples']
  report.skipped = [tuple(s) for s in existing['skipped']]
  report.converted = [tuple(c) for c in existing['converted']]
  report.reused_existing = True
  return report


def _below_warning_from_tfds(record: logging.LogRecord) -> bool:
  return (record.levelno >= logging.WARNING
          or 'tensorflow_datasets' not in record.pathname)


@contextlib.contextmanager
def _quiet_tfds():
  """Silences TFDS's banners, progress bars and info logs (temp dir names)."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  was_active = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.display_progress_bar(False)
  absl_logger = logging.getLogger('absl')  # TFDS logs through absl.
  absl_logger.addFilter(_below_warning_from_tfds)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.removeFilter(_below_warning_from_tfds)
    tqdm_utils.display_progress_bar(was_active)


def check_new_out_dir(out_dir: str) -> None:
  """A dataset may only be written to a new or empty directory."""
  if os.path.exists(out_dir) and not (os.path.isdir(out_dir)
                                      and not os.listdir(out_dir)):
    raise UserError(f'out: {out_dir!r} already exists; pick a new directory '
                    'or delete it.')


def write_dataset(out_dir: str, make_builder: Callable, files: Callable, *,
                  exist_ok: bool = False) -> bool:
  """Runs a TFDS builder and renames its finished output to `out_dir`.

  Args:
    out_dir: absolute path of the new dataset (absent or an empty directory).
    make_builder: data_dir -> a `GeneratorBasedBuilder` writing there.
    files: () -> {file name: JSON-able}, called after the records are
      written (so it can report on them); each is saved beside them.
    exist_ok: another process finishing `out_dir` first is not an error.

  Returns:
    True if this call wrote `out_dir`; False if, with `exist_ok`, another
    process's finished copy was already there.

  Everything is written into a hidden temporary directory beside `out_dir`
  that is removed whatever happens, so `out_dir` is either absent/empty or a
  complete dataset.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.incomplete-',
                         dir=parent)
  try:
    builder = make_builder(os.path.join(tmp, 'data'))
    with _quiet_tfds():
      builder.download_and_prepare(
          download_dir=os.path.join(tmp, 'downloads'),
          download_config=tfds.download.DownloadConfig(
              try_download_gcs=False,
              compute_stats=tfds.download.ComputeStatsMode.SKIP))
    built = builder.data_dir
    for name, content in files().items():
      with open(os.path.join(built, name), 'w') as f:
        json.dump(content, f, indent=1)
    try:
      os.rename(built, out_dir)
    except OSError:
      if not (exist_ok and is_dataset_dir(out_dir)):
        raise
      return False
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return True


def build_image_dataset(src_dir: str, out_dir: str, resolution,
                        crop: str = 'center', seed: int = 0, *,
                        exist_ok: bool = False) -> BuildReport:
  """Builds the ArrayRecord dataset `out_dir` from the images in `src_dir`.

  Args:
    src_dir: folder searched recursively for jpg / jpeg / png / webp files.
    out_dir: where the dataset goes; must not exist, or be an empty folder.
    resolution: int (square) or (H, W), or a string '256' / '512,1024'.
    crop: 'center' or 'random' crop after an aspect-keeping resize, or 'none'
      to stretch to (H, W).
    seed: seeds the 'random' crops (the same seed gives the same dataset).
    exist_ok: if `out_dir` is already a finished dataset, before or after
      this build, keep it and return (for caches shared between processes).

  Returns:
    A `BuildReport`; `print(report.summary())` lists skipped files.
  """
  hw = parse_resolution(resolution)
  if crop not in CROPS:
    raise UserError(f'crop: {crop!r} is not one of {", ".join(CROPS)}.')
  src_dir, out_dir = os.path.abspath(src_dir), os.path.abspath(out_dir)
  report = BuildReport(out_dir=out_dir, resolution=hw, crop=crop)
  if exist_ok and is_dataset_dir(out_dir):
    return _reused(report)
  if not os.path.isdir(src_dir):
    raise UserError(f'src: {src_dir!r} is not a directory.')
  check_new_out_dir(out_dir)
  names, report.ignored_files = list_images(src_dir)
  if not names:
    raise UserError(f'src: no {"/".join(e[1:] for e in IMAGE_EXTENSIONS)} '
                    f'files in {src_dir!r}.')
  builder_class = _make_builder_class()
  written = write_dataset(
      out_dir,
      lambda data_dir: builder_class(
          src_dir=src_dir, names=names, hw=hw, crop=crop, seed=seed,
          report=report, data_dir=data_dir, file_format='array_record'),
      lambda: {REPORT_FILE: {
          'src_dir': src_dir, 'resolution': list(hw), 'crop': crop,
          'seed': seed, 'num_examples': report.num_examples,
          'skipped': report.skipped, 'converted': report.converted}},
      exist_ok=exist_ok)
  if not written:
    _reused(report)
  return report


def main(argv: Sequence[str]) -> int:
  """Command line: see the module docstring; returns the exit code."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      description='Build an ArrayRecord image dataset from a folder.')
  parser.add_argument('--src', required=True, help='folder of images')
  parser.add_argument('--out', required=True, help='new dataset directory')
  parser.add_argument('--resolution', required=True,
                      help='one int (square) or H,W')
  parser.add_argument('--crop', default='center', choices=CROPS)
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the random crops')
  args = parser.parse_args(argv)
  try:
    report = build_image_dataset(args.src, args.out, args.resolution,
                                 crop=args.crop, seed=args.seed)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(report.summary())
  return 0
