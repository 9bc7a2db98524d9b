"""DiffusionRig buffers: build a dataset of images and their physical buffers, and read it
as the source 'rig_folder' (data.path), with the examples of 'rig_subjects'.

  python data_prep/build_buffer_dataset.py --images=DIR --buffers=DIR --out=DIR --resolution=256 [--album]

Each image `name.png|jpg|jpeg|webp` under --images (recursively) pairs with
`name.npz` at the same relative place under --buffers, holding

  normal   [H, W, 3]  world-space normals times the face mask, ≈[−1, 1]
  albedo   [H, W, 3]  ≈[0, 1], times the mask
  alpha    [H, W]     the face mask in [0, 1]
  light    [9, 3]     SH coefficients per colour (models/sh_lighting.py)
  rendered [H, W, 3]  optional: sh_lighting.shade of the above (computed when absent)
  shape [100], exp [50], pose [6], cam [3], tex [50]   optional FLAME/DECA parameters (all or none)

as raw floats, background 0, at the image's H x W, which must be --resolution
(nothing is resized). A pair that breaks any of this (see `check_pair`) is
skipped and listed in the report with what is allowed; it never aborts the
build. The dataset is written atomically (folder.write_dataset).

Stage-2 albums (--album): DiffusionRig renders every album image's buffers with the album's
mean FLAME shape (one face shape per person). This builder cannot re-render (the
buffers come from DECA/FLAME outside this project); with --album it computes the mean of the
images' `shape` parameters, writes it beside the records (album_shape.json: mean_shape [100],
each image's L2 distance from it, images without FLAME parameters, and buffers_use_mean_shape:
whether every image's shape equals the mean, i.e. the buffers were rendered with it) and
reports the distances. For the faithful recipe, export each image's buffers from DECA with
shape = mean_shape and rebuild. Buffers rendered with each image's own shape still train (the
builder only reports); the dataset then records that they were not the faithful ones.

Records: 'image' uint8, 'normal' / 'albedo' / 'rendered' float16 [H, W, 3],
'alpha' float16 [H, W] (float16 halves the size; its rounding, ≤ 2.5e-4 on
[−1, 1], is far below 8-bit image steps), 'light' float32 [9, 3], the FLAME
parameters float32 (zeros when 'flame' is False), 'index', 'file_name'.
Batches are those of rig_subjects: 'image' in [−1, 1], the buffers float32, and
'physical' [PHYSICAL_SIZE]: the light flattened and the FLAME parameters (zeros when
the dataset has none; the vector-conditioned model refuses such a dataset).
"""

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from visgen_jax import image_io
from visgen_jax.data import folder, registry, rig_subjects
from visgen_jax.data.images import ImageInfo
from visgen_jax.errors import UserError
from visgen_jax.models import sh_lighting

BUILD_COMMAND = ('python data_prep/build_buffer_dataset.py --images=IMAGES --buffers=BUFFERS '
                 '--out={out} --resolution=N')
FLAME_SIZES = {'shape': 100, 'exp': 50, 'pose': 6, 'cam': 3, 'tex': 50}
# The parts of the 'physical' vector, in order (rig_subjects.physical_vector).
PHYSICAL = {'light': (9, 3), **{k: (n,) for k, n in FLAME_SIZES.items()}}
PHYSICAL_SIZE = rig_subjects.physical_size(PHYSICAL)
STORED_AS_HALF = ('normal', 'albedo', 'rendered', 'alpha')
# Normals interpolated across a mesh face are shorter than 1 (DECA rasterises vertex normals
# without renormalising): 0.02 admits vertex normals up to ~23° apart and 8-bit quantisation,
# and refuses unnormalised or colour-encoded ((n + 1) / 2) normals.
UNIT_TOLERANCE = 0.02
# Albedo from a texture model is not clamped and may overshoot [0, 1] a little.
RANGE_MARGIN = 0.05
ALBUM_FILE = 'album_shape.json'
# Shapes fitted to different photos of one person differ far more; float32 copies of one mean
# shape (a DECA export with the shape fixed) agree to rounding.
SAME_SHAPE_TOLERANCE = 1e-5
# `rendered` may be stored at half precision or as 8 bits of a [0, 1] image: 0.01 is above
# both roundings and below 3/255, a visibly different shading.
RENDER_TOLERANCE = 0.01


class BadPair(ValueError):
  """Why an image and its buffers are skipped."""


def _check_shape(buffers: dict, key: str, shape: tuple, what: str) -> None:
  got = np.shape(buffers[key])
  if got != shape:
    raise BadPair(f'{key} has shape {got}; allowed: {shape} ({what}).')


def _check_range(buffers: dict, key: str, low: float, high: float) -> None:
  values = buffers[key]
  if not (np.all(np.isfinite(values)) and values.min() >= low and values.max() <= high):
    raise BadPair(f'{key} has values in [{np.nanmin(values):.3g}, {np.nanmax(values):.3g}]; '
                  f'allowed: finite, within [{low:.3g}, {high:.3g}].')


def check_pair(image: np.ndarray, buffers: dict, *, estimate_light: bool = False) -> dict:
  """The checked buffers (float32, 'rendered' computed when absent) of uint8 `image` [H, W, 3];
  raises BadPair naming the buffer and what is allowed. With estimate_light, a missing light
  is fitted to the image (least squares: the image is linear in the light)."""
  h, w = image.shape[:2]
  required = ('normal', 'albedo', 'alpha') + (() if estimate_light else ('light',))
  missing = [k for k in required if k not in buffers]
  if missing:
    raise BadPair(f'no {", ".join(missing)}; required: {", ".join(required)}.')
  flame = [k for k in FLAME_SIZES if k in buffers]
  if flame and len(flame) != len(FLAME_SIZES):
    raise BadPair(f'has FLAME parameters {", ".join(flame)} only; allowed: all of '
                  f'{", ".join(FLAME_SIZES)} or none.')
  buffers = {k: np.asarray(v, np.float32) for k, v in buffers.items()
             if k in (*STORED_AS_HALF, 'light', *flame)}
  for key in ('normal', 'albedo', 'rendered'):
    if key in buffers:
      _check_shape(buffers, key, (h, w, 3), "the image's H x W, 3 channels")
  _check_shape(buffers, 'alpha', (h, w), "the image's H x W")
  if 'light' not in buffers:
    buffers['light'] = np.asarray(sh_lighting.estimate_light(
        image.astype(np.float32) / 255, buffers['normal'], buffers['albedo'], buffers['alpha']), np.float32)
  _check_shape(buffers, 'light', (9, 3), 'SH coefficients x colours')
  for key in flame:
    _check_shape(buffers, key, (FLAME_SIZES[key],), f'FLAME {key}')
  _check_range(buffers, 'normal', -1 - UNIT_TOLERANCE, 1 + UNIT_TOLERANCE)
  for key in ('albedo', 'alpha'):
    _check_range(buffers, key, -RANGE_MARGIN, 1 + RANGE_MARGIN)
  for key in ('light', *flame):
    _check_range(buffers, key, -np.inf, np.inf)
  length = np.linalg.norm(buffers['normal'][buffers['alpha'] > 0.5], axis=-1)
  if length.size and np.abs(length - 1).max() > UNIT_TOLERANCE:
    raise BadPair(f'normal has lengths in [{length.min():.3g}, {length.max():.3g}] inside the mask '
                  f'(alpha > 0.5); allowed: unit length ± {UNIT_TOLERANCE}.')
  shaded = np.asarray(sh_lighting.shade(buffers['normal'], buffers['albedo'], buffers['alpha'],
                                        buffers['light']))
  if 'rendered' in buffers:
    error = np.abs(buffers['rendered'] - shaded).max()
    if not error <= RENDER_TOLERANCE:
      raise BadPair(f'rendered differs from sh_lighting.shade(normal, albedo, alpha, light) by up to '
                    f'{error:.3g}; allowed: {RENDER_TOLERANCE} (or leave rendered out to compute it).')
  buffers['rendered'] = shaded
  return buffers


def _record(images_dir: str, buffers_dir: str, name: str, hw: tuple[int, int]):
  """(name, record without 'index') or (name, why it is skipped)."""
  buffers_path = os.path.join(buffers_dir, os.path.splitext(name)[0] + '.npz')
  try:
    image, _ = image_io.load_rgb(os.path.join(images_dir, name))
    image = np.asarray(image)
    if image.shape[:2] != hw:
      raise BadPair(f'the image is {image.shape[0]}x{image.shape[1]}; allowed: {hw[0]}x{hw[1]} '
                    '(--resolution; images and buffers are not resized).')
    if not os.path.isfile(buffers_path):
      raise BadPair(f'no buffers {os.path.relpath(buffers_path, buffers_dir)} in --buffers.')
    with np.load(buffers_path) as f:
      buffers = check_pair(image, {k: f[k] for k in f.files})
  except Exception as e:  # pylint: disable=broad-except
    # As in the image builder: one bad pair (corrupt file, wrong buffers) must not sink a build.
    return name, f'{e}' if isinstance(e, BadPair) else f'{type(e).__name__}: {e}'
  record = {k: buffers[k].astype(np.float16) if k in STORED_AS_HALF else buffers[k] for k in buffers}
  has_flame = 'shape' in buffers
  for key, size in FLAME_SIZES.items():
    record.setdefault(key, np.zeros(size, np.float32))
  return name, dict(record, image=image, flame=has_flame, file_name=name)


@dataclasses.dataclass
class BuildReport:
  """What `build_buffer_dataset` did."""
  out_dir: str
  resolution: tuple[int, int]
  num_examples: int = 0
  num_with_flame: int = 0
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  album: bool = False  # the images are one person's stage-2 album
  shapes: dict = dataclasses.field(default_factory=dict)  # album only: file name -> FLAME shape or None

  def album_shape(self) -> dict:
    """ALBUM_FILE's content (see the module docstring); the album has FLAME shapes."""
    known = {name: shape for name, shape in self.shapes.items() if shape is not None}
    mean = np.mean(list(known.values()), axis=0)
    distance = {name: float(np.linalg.norm(shape - mean)) for name, shape in known.items()}
    without = [name for name, shape in self.shapes.items() if shape is None]
    return {'mean_shape': mean.tolist(), 'distance_from_mean': distance, 'images_without_shape': without,
            'buffers_use_mean_shape': not without and max(distance.values()) <= SAME_SHAPE_TOLERANCE}

  def _album_lines(self) -> list[str]:
    if not self.num_with_flame:
      return ['album: no image has FLAME parameters, so the mean shape that the faithful stage 2 renders '
              'every buffer with is unknown here.']
    album = self.album_shape()
    if album['buffers_use_mean_shape']:
      return [f'album: every image\'s buffers use one FLAME shape, the mean (in {ALBUM_FILE}).']
    return [f'album: the mean FLAME shape of {len(album["distance_from_mean"])} images is in {ALBUM_FILE}; their '
            'buffers do not all use it: for the faithful stage-2 recipe export them from DECA with '
            'shape = mean_shape and rebuild. Distance (L2) of each shape from the mean:',
            *(f'  {name}: {d:.4g}' for name, d in album['distance_from_mean'].items()),
            *(f'  {name}: no FLAME parameters' for name in album['images_without_shape'])]

  def summary(self) -> str:
    h, w = self.resolution
    lines = [f'{self.num_examples} images with buffers at {h}x{w} ({self.num_with_flame} with FLAME '
             f'parameters) in {self.out_dir}']
    if self.album:
      lines.extend(self._album_lines())
    if self.skipped:
      lines.append(f'skipped {len(self.skipped)} pairs:')
      lines.extend(f'  {name}: {reason}' for name, reason in self.skipped)
    return '\n'.join(lines)


def _features(hw: tuple[int, int]):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Raw bytes, as in folder.py: the default stores every value as a proto number.
  tensor = lambda shape, dtype: tfds.features.Tensor(shape=shape, dtype=dtype, encoding='bytes')
  return tfds.features.FeaturesDict({
      'image': tensor((*hw, 3), np.uint8),
      **{k: tensor((*hw, 3), np.float16) for k in ('normal', 'albedo', 'rendered')},
      'alpha': tensor(hw, np.float16),
      'light': tensor((9, 3), np.float32),
      **{k: tensor((n,), np.float32) for k, n in FLAME_SIZES.items()},
      'flame': tfds.features.Tensor(shape=(), dtype=np.bool_),
      'index': tfds.features.Tensor(shape=(), dtype=np.int64),
      'file_name': tfds.features.Text(),
  })


def _make_builder(data_dir, *, images_dir, buffers_dir, names, hw, report):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class RigBuffers(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images and their DiffusionRig buffers, in file-name order."""
    VERSION = tfds.core.Version('1.0.0')
    code_path = None  # See folder.py: nothing is downloaded.

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description='DiffusionRig buffers (visgen_jax data_prep).',
                                   features=_features(hw), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {folder.SPLIT: self._generate_examples()}

    def _generate_examples(self):
      index = 0
      pairs = folder.map_in_order(lambda name: _record(images_dir, buffers_dir, name, hw), names)
      for name, record in pairs:
        if isinstance(record, str):
          report.skipped.append((name, record))
          continue
        report.num_with_flame += bool(record['flame'])
        if report.album:
          report.shapes[name] = record['shape'] if record['flame'] else None
        yield index, dict(record, index=index)
        index += 1
      if index == 0:
        name, why = report.skipped[-1]
        raise UserError(f'images: none of the {len(names)} images has valid buffers (e.g. {name}: {why}).')
      report.num_examples = index

  return RigBuffers(data_dir=data_dir, file_format='array_record')


def build_buffer_dataset(images_dir: str, buffers_dir: str, out_dir: str, resolution,
                         album: bool = False) -> BuildReport:
  """Builds the ArrayRecord dataset `out_dir` (new or empty) from the pairs of image and .npz;
  with `album`, also ALBUM_FILE (one person's stage-2 album, see the module docstring)."""
  hw = folder.parse_resolution(resolution)
  images_dir, buffers_dir, out_dir = (os.path.abspath(d) for d in (images_dir, buffers_dir, out_dir))
  for flag, path in (('images', images_dir), ('buffers', buffers_dir)):
    if not os.path.isdir(path):
      raise UserError(f'{flag}: {path!r} is not a directory.')
  folder.check_new_out_dir(out_dir)
  names, _ = folder.list_images(images_dir)
  if not names:
    raise UserError(f'images: no {"/".join(e[1:] for e in folder.IMAGE_EXTENSIONS)} files in {images_dir!r}.')
  report = BuildReport(out_dir=out_dir, resolution=hw, album=album)

  def files():
    build = {'images_dir': images_dir, 'buffers_dir': buffers_dir, 'resolution': list(hw),
             'num_examples': report.num_examples, 'num_with_flame': report.num_with_flame,
             'skipped': report.skipped}
    album_file = {ALBUM_FILE: report.album_shape()} if album and report.num_with_flame else {}
    return {folder.REPORT_FILE: build, **album_file}

  folder.write_dataset(
      out_dir,
      lambda data_dir: _make_builder(data_dir, images_dir=images_dir, buffers_dir=buffers_dir, names=names,
                                     hw=hw, report=report),
      files)
  return report


def main(argv: Sequence[str]) -> int:
  """Command line: see the module docstring; returns the exit code."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      description='Build an ArrayRecord dataset of images and their DiffusionRig buffers.',
      epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--images', required=True, help='folder of images')
  parser.add_argument('--buffers', required=True, help='folder of name.npz beside each image name')
  parser.add_argument('--out', required=True, help='new dataset directory')
  parser.add_argument('--resolution', required=True, help="the images' size: one int (square) or H,W")
  parser.add_argument('--album', action='store_true',
                      help=f"one person's stage-2 album: write the mean FLAME shape ({ALBUM_FILE}) and report "
                           'how far each image\'s shape is from it (see "Stage-2 albums" below)')
  args = parser.parse_args(argv)
  try:
    report = build_buffer_dataset(args.images, args.buffers, args.out, args.resolution, args.album)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(report.summary())
  return 0


def num_with_flame(path: str) -> int:
  """How many images of the dataset at `path` have FLAME parameters (its build report)."""
  with open(os.path.join(path, folder.REPORT_FILE)) as f:
    return json.load(f)['num_with_flame']


def _example(record, rng=None):
  """Stored precision (uint8, float16) across workers; `_to_float` widens in the main process."""
  return ({k: record[k] for k in ('image', *rig_subjects.BUFFERS, 'alpha')} | {'index': np.int32(record['index'])}
          | {'physical': rig_subjects.physical_vector(record, PHYSICAL)})


def _to_float(batch):
  return dict({k: np.asarray(batch[k], np.float32) for k in (*rig_subjects.BUFFERS, 'alpha')},
              image=image_io.to_float(batch['image']), index=np.asarray(batch['index']),
              physical=np.asarray(batch['physical']))


@registry.register('rig_folder')
class RigFolder(registry.Source):
  """A dataset made by data_prep/build_buffer_dataset.py, at data.path."""
  keys = ('resolution', 'path')

  def check(self, data_config):
    folder.parse_resolution(data_config.resolution, 'data.resolution')
    registry.dataset_path(data_config, BUILD_COMMAND.format(out='DIR'))

  def open(self, data_config):
    path = registry.dataset_path(data_config, BUILD_COMMAND.format(out='DIR'))
    if not folder.is_dataset_dir(path):
      raise UserError(f'data.path: no dataset at {path!r} (build one with: {BUILD_COMMAND.format(out=path)}).')
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder_from_directory(path)
    if folder.SPLIT not in builder.info.splits or 'normal' not in builder.info.features:
      raise UserError(f'data.path: {path!r} is not a buffer dataset made by data_prep/build_buffer_dataset.py.')
    records = builder.as_data_source(folder.SPLIT)
    return records, ImageInfo(name=self.name, path=path, num_examples=len(records),
                              resolution=tuple(builder.info.features['image'].shape[:2]))

  def spec(self, data_config):
    return rig_subjects.spec(folder.parse_resolution(data_config.resolution, 'data.resolution'), PHYSICAL_SIZE)

  def transform(self, data_config, info, train):
    hw = folder.parse_resolution(data_config.resolution, 'data.resolution')
    if info.resolution != hw:
      raise UserError(f'data.resolution={data_config.resolution!r} does not match the {info.resolution} images '
                      f'in {info.path!r}; allowed: {info.resolution[0]} (or rebuild the dataset).')
    return _example

  def finish(self, data_config, info):
    return _to_float
