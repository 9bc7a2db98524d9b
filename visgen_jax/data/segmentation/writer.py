"""Writing segmentation datasets in the record format of records.py.

  report = write_segmentation_dataset(out_dir, items, categories,
                                      dataset=..., split=..., kind=...)
  print(report.summary())

A source layout (data_prep/build_segmentation_dataset.py, or the synthetic
set of sample.py) gives one `SourceItem` per image, read lazily in threads.
Unreadable images and annotations are skipped and listed in the report; the
dataset is written into a hidden temporary directory and renamed into place
only when complete.
"""

import dataclasses
import io
import json
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError
from tqdm import tqdm

from visgen_jax import image_io
from visgen_jax.data import folder
from visgen_jax.data.segmentation import records
from visgen_jax.errors import UserError


class Annotation(NamedTuple):
  """What a source layout gives for one image."""
  ids: np.ndarray  # int32 [H, W] segment ids, 0 = void
  segments: list  # (segment id, category index, iscrowd) per segment
  encoded: bytes | None = None  # `ids` already as an RGB PNG, stored as is


@dataclasses.dataclass(frozen=True)
class SourceItem:
  """One image of a source layout, read lazily (in a thread)."""
  image_id: str
  name: str  # for the report, e.g. the image path relative to the source
  image: Callable[[], bytes]  # the encoded image file
  annotation: Callable[[], Annotation]


def read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def normalise_categories(categories) -> list[dict]:
  """[{id, name, isthing, color}] from dicts with at least a name."""
  if not categories:
    raise UserError('categories: the category table is empty.')
  rng = np.random.default_rng(0)  # Colours for tables that have none.
  table = []
  for i, c in enumerate(categories):
    color = rng.integers(0, 256, 3).tolist()
    name = str(c.get('name', '')).strip()
    if not name:
      raise UserError(f'categories: entry {i} has no name.')
    try:
      entry = {'id': int(c.get('id', i)), 'name': name,
               'isthing': c.get('isthing', False) in (True, 1),
               'color': [int(v) for v in c.get('color', color)]}
    except (TypeError, ValueError):
      entry = {'color': ()}
    if len(entry['color']) != 3:
      raise UserError(f'categories: {name!r} needs an integer id, isthing '
                      'true/false/0/1 and a colour [r, g, b].')
    table.append(entry)
  return table


@dataclasses.dataclass
class BuildReport:
  """What `write_segmentation_dataset` did."""
  out_dir: str
  dataset: str
  split: str
  num_examples: int = 0
  num_segments: int = 0
  proposals: bool = False
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  reused_existing: bool = False

  def summary(self) -> str:
    lines = [f'{self.num_examples} images, {self.num_segments} segments '
             f'({self.dataset} {self.split}'
             f'{", with proposals" if self.proposals else ""}) in '
             f'{self.out_dir}']
    if self.reused_existing:
      lines.append('(this dataset already existed; it was not rebuilt)')
    if self.converted:
      lines.append(f'converted {len(self.converted)} images to RGB PNG')
    if self.skipped:
      lines.append(f'skipped {len(self.skipped)} images:')
      lines.extend(f'  {name}: {reason}' for name, reason in self.skipped)
    return '\n'.join(lines)


def _image_record(data: bytes) -> tuple[bytes, tuple[int, int], str | None]:
  """(stored bytes, (H, W), original mode if converted) or raises."""
  image, mode = image_io.load_rgb(io.BytesIO(data), exif_transpose=False)
  with Image.open(io.BytesIO(data)) as img:
    kind = img.format
  if mode == 'RGB' and kind in ('JPEG', 'PNG'):
    return data, (image.height, image.width), None
  buffer = io.BytesIO()
  image.save(buffer, 'PNG', compress_level=1)
  return buffer.getvalue(), (image.height, image.width), f'{kind} {mode}'


def _prepare(item: SourceItem, num_classes: int, proposals_dir: str | None):
  """(item, record or None, reason or converted mode) for one image.

  Unreadable images and annotations are reported, not raised; a bad
  proposals file is the user's to fix and raises.
  """
  try:
    image, (h, w), converted = _image_record(item.image())
  except UnidentifiedImageError:
    return item, None, 'image: not in a format Pillow can read'
  except Exception as e:  # pylint: disable=broad-except
    return item, None, f'image: {type(e).__name__}: {e}'
  try:
    ann = item.annotation()
  except Exception as e:  # pylint: disable=broad-except
    return item, None, f'annotation: {type(e).__name__}: {e}'
  if ann.ids.shape != (h, w):
    return item, None, (f'annotation is {ann.ids.shape[0]}x{ann.ids.shape[1]}'
                        f' but the image is {h}x{w}')
  seg_ids = np.array([s[0] for s in ann.segments], np.int32)
  classes = np.array([s[1] for s in ann.segments], np.int32)
  if (seg_ids <= 0).any() or len(set(seg_ids.tolist())) != len(seg_ids):
    return item, None, 'segment ids must be unique and positive'
  if ((classes < 0) | (classes >= num_classes)).any():
    return item, None, f'a category index is outside [0, {num_classes})'
  record = {
      'image': image,
      'panoptic': ann.encoded or records.encode_ids(ann.ids),
      'segment_ids': seg_ids,
      'segment_classes': classes,
      'segment_iscrowd': np.array([bool(s[2]) for s in ann.segments], bool),
      'image_id': item.image_id, 'height': h, 'width': w}
  if proposals_dir is not None:
    path = os.path.join(proposals_dir, f'{item.image_id}.npz')
    record['proposals'] = records.proposals_bytes(
        records.load_proposals(path, (h, w)))
  return item, record, converted


def _features(with_proposals: bool):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  blob = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)
  ragged = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)
  scalar = lambda dtype: tfds.features.Tensor(shape=(), dtype=dtype)
  features = {
      'image': blob(), 'panoptic': blob(),
      'segment_ids': ragged(np.int32), 'segment_classes': ragged(np.int32),
      'segment_iscrowd': ragged(np.bool_),
      'index': scalar(np.int64), 'image_id': tfds.features.Text(),
      'height': scalar(np.int32), 'width': scalar(np.int32)}
  if with_proposals:
    features['proposals'] = blob()
  return tfds.features.FeaturesDict(features)


def _make_builder(data_dir, *, split, items, num_classes, proposals_dir,
                  report, progress):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class Segmentation(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images with panoptic segment maps, in source order."""
    VERSION = tfds.core.Version('1.0.0')
    code_path = None  # See folder.py: nothing is downloaded.

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description='Segmentation (visgen_jax data_prep).',
          features=_features(proposals_dir is not None),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples()}

    def _generate_examples(self):
      index = 0
      prepared = folder.map_in_order(
          lambda item: _prepare(item, num_classes, proposals_dir), items)
      for item, record, note in tqdm(prepared, total=len(items), unit='img',
                                     disable=not progress):
        if record is None:
          report.skipped.append((item.name, note))
          continue
        if note:
          report.converted.append((item.name, note))
        report.num_segments += len(record['segment_ids'])
        yield index, {**record, 'index': index}
        index += 1
      if index == 0:
        name, why = report.skipped[-1]
        raise UserError(f'src: none of the {len(items)} images could be read '
                        f'({name}: {why}).')
      report.num_examples = index

  return Segmentation(data_dir=data_dir, file_format='array_record')


def _check_proposal_files(items, proposals_dir: str) -> None:
  if not os.path.isdir(proposals_dir):
    raise UserError(f'proposals: {proposals_dir!r} is not a directory.')
  present = set(os.listdir(proposals_dir))
  missing = [i.image_id for i in items if f'{i.image_id}.npz' not in present]
  if missing:
    raise UserError(f'proposals: no {missing[0]}.npz in {proposals_dir!r} '
                    f'({len(missing)} of {len(items)} images have none); '
                    'save one file per image, masks [0, H, W] for none.')


def write_segmentation_dataset(
    out_dir: str, items: Sequence[SourceItem], categories, *, dataset: str,
    split: str, kind: str, proposals_dir: str | None = None,
    progress: bool = False, exist_ok: bool = False, source: str = '',
    skipped: Sequence[tuple[str, str]] = ()) -> BuildReport:
  """Writes `items` as a segmentation dataset at `out_dir`, atomically.

  Args:
    out_dir: the new dataset directory (absent or empty).
    items: the images, in the order they are stored.
    categories: dicts with 'name' and optionally 'id', 'isthing', 'color'.
    dataset: the source format's name, recorded in segmentation.json.
    split: 'train' or 'val', the TFDS split name.
    kind: 'panoptic' or 'semantic'.
    proposals_dir: a folder with one `<image_id>.npz` per image, or None.
    progress: show a progress bar.
    exist_ok: a finished dataset at `out_dir` (before or after) is kept.
    source: recorded in the report (e.g. the source directory).
    skipped: (name, why) of source files the caller already left out; they
      head the report's list.

  Returns:
    A `BuildReport`; unreadable images are skipped and listed there.
  """
  out_dir = os.path.abspath(out_dir)
  report = BuildReport(out_dir=out_dir, dataset=dataset, split=split,
                       proposals=proposals_dir is not None,
                       skipped=list(skipped))
  if exist_ok and folder.is_dataset_dir(out_dir):
    return _reused(report)
  folder.check_new_out_dir(out_dir)
  table = normalise_categories(categories)
  if not items:
    raise UserError(f'src: no images found for {dataset} {split}.')
  ids = [i.image_id for i in items]
  if len(set(ids)) != len(ids):
    duplicate = next(i for i in ids if ids.count(i) > 1)
    raise UserError(f'src: two images share the id {duplicate!r} (the file '
                    'name without extension); ids must be unique.')
  if proposals_dir is not None:
    proposals_dir = os.path.abspath(proposals_dir)
    _check_proposal_files(items, proposals_dir)

  def files():
    meta = {'format': records.FORMAT, 'version': 1, 'dataset': dataset,
            'split': split, 'kind': kind, 'proposals': report.proposals,
            'num_examples': report.num_examples, 'categories': table}
    build = {'source': source, 'dataset': dataset, 'split': split,
             'proposals_dir': proposals_dir,
             'num_examples': report.num_examples,
             'num_segments': report.num_segments,
             'skipped': report.skipped, 'converted': report.converted}
    return {records.META_FILE: meta, folder.REPORT_FILE: build}

  written = folder.write_dataset(
      out_dir,
      lambda data_dir: _make_builder(
          data_dir, split=split, items=items, num_classes=len(table),
          proposals_dir=proposals_dir, report=report, progress=progress),
      files, exist_ok=exist_ok)
  return report if written else _reused(report)


def _reused(report: BuildReport) -> BuildReport:
  with open(os.path.join(report.out_dir, folder.REPORT_FILE)) as f:
    existing = json.load(f)
  report.num_examples = existing['num_examples']
  report.num_segments = existing['num_segments']
  report.skipped = [tuple(s) for s in existing['skipped']]
  report.converted = [tuple(c) for c in existing['converted']]
  report.reused_existing = True
  return report


