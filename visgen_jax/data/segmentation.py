"""Panoptic / semantic segmentation datasets: record format, proposals, grain.

  info = make_segmentation_source(config.data)[1]    # info.categories: names
  it = make_segmentation_iterator(config.data, local_batch_size=b, seed=0)
  batch = next(it)            # see "Batches" below
  state = it.get_state()      # it.set_state(state) resumes exactly
  example_segmentation_batch(config.data, b)    # zeros shaped like a batch

Datasets are written by data_prep/build_segmentation_dataset.py (COCO
panoptic, ADE20K-150, ADE20K-847, PASCAL Context 59 / 459) or synthesised
(`data.name='seg_sample'`, below), always with `write_segmentation_dataset`.

Record format
-------------
A dataset directory is a TFDS ArrayRecord dataset (no TensorFlow needed) of
one split, plus `segmentation.json` (the category table and how it was made)
and `build_report.json`. Each record holds

  image            bytes   the image as PNG or JPEG, RGB, at its own size.
                           Source JPEG/PNG files that are RGB are stored
                           byte for byte; anything else (gray, CMYK, alpha,
                           16-bit, WebP) is converted to RGB and stored as
                           PNG. The stored pixel order is used as is (no EXIF
                           rotation), which is what annotation maps match.
  panoptic         bytes   PNG, RGB, same size as the image: the segment id
                           of every pixel, id = R + 256 G + 256^2 B (COCO's
                           panoptic encoding). Id 0 is void: no segment.
  segment_ids      int32 [N]   ids of the segments in `panoptic`, all > 0
  segment_classes  int32 [N]   category of each segment: an index into the
                               category table (0 .. C-1)
  segment_iscrowd  bool  [N]   COCO crowd regions (never a training target)
  index            int64   position in the dataset
  image_id         text    the image file's name without its extension
                           (e.g. '000000000139'); names its proposals file
  height, width    int32   the image size
  proposals        bytes   only when built with --proposals: the image's
                           proposals `.npz`, validated (format below)

`segmentation.json`: {"format": "visgen_jax.segmentation", "version": 1,
"dataset": the source format, "split", "kind": "panoptic" | "semantic",
"proposals": bool, "num_examples", "categories": [{"id", "name", "isthing",
"color": [r, g, b]}, ...]}. A segment's class c is the c-th entry; "id" is
the source dataset's own id where it has one (COCO category id, ADE-150 Idx,
PASCAL Context labels.txt index), else the position.

Semantic-only sources (ADE20K-150, ADE20K-847, PASCAL Context 59 / 459) have
no instances: each class present in an image becomes one segment with id
class + 1. Their official files carry no thing/stuff split, so every class
is stored with isthing = False unless the user's --categories JSON says
otherwise. Label values that are not a class (ADE-150's 0 "other", the 255 of
8-bit maps and the 65535 of 16-bit maps, any value >= the class count) become
void (id 0). Void pixels are in no target mask: training ignores them, and
`semantic_map` reports them as IGNORE_LABEL = -1 (255 cannot mark "ignore"
when there are 459 or 847 classes).

Proposals format
----------------
One `<image_id>.npz` per image (numpy.savez / savez_compressed; see
`save_proposals`), holding

  masks   [M, H, W] at the image's own size H x W: bool (or uint8, nonzero =
          inside) binary masks, or float16 / float32 mask logits
          (inside where > 0)
  scores  optional [M] float: the proposal network's confidences

M = 0 is allowed and means no proposals (a defined empty result). A size that
is not the image's, a non-finite logit or score, or a missing `masks` key is a
`UserError` naming the file. `load_proposals(path, (H, W))` reads and checks
one file; building with --proposals=DIR stores them in the records. Without
proposals, batches use the ground-truth masks as proposals (the paper's
Table 2.7 mode).

Batches
-------
data config keys: name ('seg_sample' | 'segmentation'), path (the dataset
for 'segmentation'), resolution (S: batches are S x S), random_flip,
scale_range ((lo, hi), train only), max_segments (K), max_proposals (M),
proposals ('auto': stored ones if the dataset has them, else ground truth;
'gt'; 'stored'), worker_count, prefetch.

  image           float32 [B, S, S, 3] in [-1, 1]; padding is 0
  target_masks    bool    [B, K, S, S]
  target_classes  int32   [B, K]      category index; -1 in padding rows
  target_valid    bool    [B, K]      False in padding rows
  proposals       float32 [B, M, S, S] mask logits (+-MASK_LOGIT for binary
                                       masks and for ground truth; padding
                                       rows and padded pixels -MASK_LOGIT)
  proposal_valid  bool    [B, M]      a real proposal with a positive pixel
  proposal_scores float32 [B, M]      its score (1 if none given; 0 padding)
  index           int32   [B]         record index
  valid_hw        int32   [B, 2]      the image's (h, w) in the top-left of
                                      the S x S canvas; the rest is padding
  orig_hw         int32   [B, 2]      the stored image size

Train: the image is resized (bilinear; maps nearest) so its shorter side is
S times a factor drawn uniformly from scale_range (default (1, 1)), cropped
at a random place where it is larger than S and padded bottom / right where
it is smaller, then flipped left-right with probability 1/2 if random_flip.
Eval: resized so its longer side is S (all of it visible), padded bottom /
right, never flipped. Targets are the non-crowd segments still visible after
that, in record order; with more than K, the K largest (still in record
order). Stored proposals keep their order; with more than M, the M best in
descending score order (the first M if there are no scores). In ground-truth
mode proposal i is target i.

The training stream is the one of `pipeline.make_train_iterator`: one global
shuffled order, each process reads its slice of every global batch, and the
saved state resumes exactly.

Built-in sample set ('seg_sample')
----------------------------------
64 synthetic 96 x 128 images made from a fixed seed, no download: a sky over
grass, water or sand (textured stuff) and one to three circles, squares and
triangles (things, each one segment, possibly overlapping). Categories:
circle, square, triangle (things), sky, grass, water, sand (stuff). Built on
first use into `$VISGEN_CACHE/datasets/` like the image sample sets.
"""

import dataclasses
import functools
import io
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

from absl import logging
import grain
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import UnidentifiedImageError
from tqdm import tqdm

from visgen_jax import image_io
from visgen_jax.data import folder
from visgen_jax.data import pipeline
from visgen_jax.data import sample_set
from visgen_jax.errors import UserError

META_FILE = 'segmentation.json'
FORMAT = 'visgen_jax.segmentation'
# Binary masks and ground truth become logits of this size: sigmoid(10) is
# within 5e-5 of 1, and it stays exact in float16.
MASK_LOGIT = 10.0
IGNORE_LABEL = -1
SAMPLE_NAME = 'seg_sample'
PROPOSAL_MODES = ('auto', 'gt', 'stored')
# Bump when the synthetic images change so that old caches are not reused.
_SAMPLE_VERSION = 1

# ---------------------------------------------------------------- encoding


def encode_ids(ids: np.ndarray) -> bytes:
  """PNG of an int32 [H, W] segment id map, COCO's RGB encoding."""
  ids = np.asarray(ids, np.int64)
  if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
    raise ValueError('segment ids must be in [0, 2**24).')
  rgb = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], -1)
  buffer = io.BytesIO()
  Image.fromarray(rgb.astype(np.uint8)).save(buffer, 'PNG', compress_level=1)
  return buffer.getvalue()


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
  """int32 [H, W] ids from a uint8 [H, W, 3] COCO panoptic PNG."""
  rgb = rgb.astype(np.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def decode_ids(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as img:
    return rgb_to_ids(np.asarray(img.convert('RGB')))


def decode_image(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert('RGB'))


# --------------------------------------------------------------- proposals


class Proposals(NamedTuple):
  """One image's mask proposals (see the module docstring)."""
  masks: np.ndarray  # [M, H, W]: bool masks, or float16 / float32 logits
  scores: np.ndarray | None  # [M] float32, or None when not given


def check_proposals(data, image_hw, where: str) -> Proposals:
  """Validates the arrays of one proposals file (a dict-like of arrays)."""
  h, w = (int(v) for v in image_hw)
  if 'masks' not in data:
    raise UserError(f'proposals: {where} has no "masks" array (it holds '
                    f'{", ".join(sorted(data)) or "nothing"}); save masks '
                    '[M, H, W] and optionally scores [M].')
  masks = np.asarray(data['masks'])
  if masks.size == 0 and masks.shape[:1] == (0,):
    return Proposals(np.zeros((0, h, w), bool),
                     np.zeros((0,), np.float32) if 'scores' in data else None)
  if masks.ndim != 3:
    raise UserError(f'proposals: masks in {where} have shape {masks.shape}; '
                    'expected [M, H, W].')
  if masks.shape[1:] != (h, w):
    raise UserError(
        f'proposals: {where} holds masks of {masks.shape[1]}x{masks.shape[2]}'
        f' but its image is {h}x{w}; proposals must be at the image size.')
  if masks.dtype == np.uint8:
    masks = masks != 0
  elif masks.dtype == np.float64:
    masks = masks.astype(np.float32)
  elif masks.dtype not in (np.bool_, np.float16, np.float32):
    raise UserError(f'proposals: masks in {where} are {masks.dtype}; use '
                    'bool / uint8 masks or float16 / float32 logits.')
  if masks.dtype != np.bool_ and not np.isfinite(masks).all():
    raise UserError(f'proposals: the mask logits in {where} are not all '
                    'finite.')
  scores = None
  if 'scores' in data:
    scores = np.asarray(data['scores'])
    if scores.shape != masks.shape[:1] or not np.issubdtype(
        scores.dtype, np.number) or not np.isfinite(scores).all():
      raise UserError(f'proposals: scores in {where} must be {len(masks)} '
                      f'finite numbers, one per mask (got {scores.dtype} '
                      f'{scores.shape}).')
    scores = scores.astype(np.float32)
  return Proposals(masks, scores)


def load_proposals(path: str, image_hw) -> Proposals:
  """Reads and checks one `<image_id>.npz` for an image of size image_hw."""
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except FileNotFoundError:
    raise UserError(f'proposals: no file {path!r}.') from None
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f'proposals: {path!r} is not a readable .npz file '
                    f'({type(e).__name__}).') from None
  return check_proposals(data, image_hw, repr(path))


def save_proposals(path: str, masks, scores=None) -> None:
  """Writes masks [M, H, W] (and scores [M]) in the proposals format."""
  arrays = {'masks': np.asarray(masks)}
  if scores is not None:
    arrays['scores'] = np.asarray(scores, np.float32)
  with open(path, 'wb') as f:
    np.savez_compressed(f, **arrays)


def _proposals_bytes(proposals: Proposals) -> bytes:
  buffer = io.BytesIO()
  arrays = {'masks': proposals.masks}
  if proposals.scores is not None:
    arrays['scores'] = proposals.scores
  np.savez_compressed(buffer, **arrays)
  return buffer.getvalue()


def _proposals_from_bytes(data: bytes) -> Proposals:
  with np.load(io.BytesIO(data), allow_pickle=False) as f:
    return Proposals(f['masks'], f['scores'] if 'scores' in f.files else None)


# ------------------------------------------------------------------ writing


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
      'panoptic': ann.encoded or encode_ids(ann.ids),
      'segment_ids': seg_ids,
      'segment_classes': classes,
      'segment_iscrowd': np.array([bool(s[2]) for s in ann.segments], bool),
      'image_id': item.image_id, 'height': h, 'width': w}
  if proposals_dir is not None:
    path = os.path.join(proposals_dir, f'{item.image_id}.npz')
    record['proposals'] = _proposals_bytes(load_proposals(path, (h, w)))
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
    meta = {'format': FORMAT, 'version': 1, 'dataset': dataset,
            'split': split, 'kind': kind, 'proposals': report.proposals,
            'num_examples': report.num_examples, 'categories': table}
    build = {'source': source, 'dataset': dataset, 'split': split,
             'proposals_dir': proposals_dir,
             'num_examples': report.num_examples,
             'num_segments': report.num_segments,
             'skipped': report.skipped, 'converted': report.converted}
    return {META_FILE: meta, folder.REPORT_FILE: build}

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


# ------------------------------------------------------------ sample set

SAMPLE_CATEGORIES = (
    {'name': 'circle', 'isthing': True, 'color': [220, 20, 60]},
    {'name': 'square', 'isthing': True, 'color': [0, 82, 200]},
    {'name': 'triangle', 'isthing': True, 'color': [250, 170, 30]},
    {'name': 'sky', 'isthing': False, 'color': [70, 130, 180]},
    {'name': 'grass', 'isthing': False, 'color': [107, 142, 35]},
    {'name': 'water', 'isthing': False, 'color': [0, 90, 140]},
    {'name': 'sand', 'isthing': False, 'color': [210, 190, 140]},
)
SAMPLE_SIZE = 64
SAMPLE_HW = (96, 128)
# Thing colours that stand out against every background.
_THING_RGB = ((230, 40, 40), (250, 140, 0), (150, 50, 200), (240, 230, 40),
              (250, 250, 250), (230, 60, 170), (30, 30, 30))


def _stuff_texture(name: str, h: int, w: int, rng) -> np.ndarray:
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  noise = rng.normal(0, 1, (h, w)).astype(np.float32)
  if name == 'sky':
    t = y / h
    rgb = np.stack([90 + 60 * t, 150 + 50 * t, 235 + 0 * t], -1)
    rgb += 4 * noise[..., None]
  elif name == 'grass':
    blades = np.sin(x * 1.7 + 3 * noise) * 12
    rgb = np.stack([60 + blades, 140 + blades + 8 * noise, 40 + 0 * x], -1)
  elif name == 'water':
    waves = np.sin(y * 0.9 + np.sin(x * 0.2) * 2) * 14
    rgb = np.stack([20 + 0 * x, 90 + waves, 160 + waves + 4 * noise], -1)
  else:  # sand
    rgb = np.stack([205 + 0 * x, 180 + 0 * x, 120 + 0 * x], -1)
    rgb += 12 * noise[..., None]
  return np.clip(rgb, 0, 255)


def _shape_mask(kind: int, h: int, w: int, rng) -> np.ndarray:
  """A random circle (0), square (1) or triangle (2) as a bool [H, W] mask."""
  size = rng.uniform(8, 22)
  cy, cx = rng.uniform(size, h - size), rng.uniform(size, w - size)
  angle = rng.uniform(0, 2 * np.pi)
  mask = Image.new('L', (w, h), 0)
  draw = ImageDraw.Draw(mask)
  if kind == 0:
    draw.ellipse([cx - size, cy - size, cx + size, cy + size], fill=1)
  else:
    corners = 4 if kind == 1 else 3
    turns = angle + 2 * np.pi * np.arange(corners) / corners
    draw.polygon([(cx + size * np.cos(t), cy + size * np.sin(t))
                  for t in turns], fill=1)
  return np.asarray(mask, bool)


def sample_example(i: int) -> tuple[np.ndarray, np.ndarray, list]:
  """Synthetic image i: (uint8 image, int32 ids, segments); deterministic."""
  h, w = SAMPLE_HW
  rng = np.random.default_rng([_SAMPLE_VERSION, i])
  horizon = int(rng.integers(h * 3 // 10, h * 6 // 10))
  ground = int(rng.integers(4, 7))  # grass, water or sand
  image = np.concatenate([_stuff_texture('sky', horizon, w, rng),
                          _stuff_texture(SAMPLE_CATEGORIES[ground]['name'],
                                         h - horizon, w, rng)])
  ids = np.ones((h, w), np.int32)
  ids[horizon:] = 2
  segments = [(1, 3, False), (2, ground, False)]
  for k in range(int(rng.integers(1, 4))):
    kind = int(rng.integers(3))
    mask = _shape_mask(kind, h, w, rng)
    colour = np.array(_THING_RGB[rng.integers(len(_THING_RGB))], np.float32)
    shade = 1 - 0.25 * np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    image = np.where(mask[..., None], colour * shade, image)
    ids[mask] = 3 + k
    segments.append((3 + k, kind, False))
  present = set(np.unique(ids).tolist())  # Shapes may hide each other.
  segments = [s for s in segments if s[0] in present]
  return np.round(image).astype(np.uint8), ids, segments


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'PNG', compress_level=1)
  return buffer.getvalue()


def _sample_item(i: int) -> SourceItem:
  example = functools.cache(lambda: sample_example(i))
  return SourceItem(
      image_id=f'shapes_{i:03d}', name=f'shapes_{i:03d}',
      image=lambda: _png(example()[0]),
      annotation=lambda: Annotation(*example()[1:]))


def sample_segmentation_dir() -> str:
  """Directory of the built-in sample set, building it on first use."""
  out = os.path.join(sample_set.cache_dir(), 'datasets',
                     f'{SAMPLE_NAME}-v{_SAMPLE_VERSION}')
  if folder.is_dataset_dir(out):
    return out
  report = write_segmentation_dataset(
      out, [_sample_item(i) for i in range(SAMPLE_SIZE)], SAMPLE_CATEGORIES,
      dataset=SAMPLE_NAME, split='train', kind='panoptic', exist_ok=True,
      source='synthesised by visgen_jax.data.segmentation')
  logging.info('Segmentation sample set: %d images in %s',
               report.num_examples, out)
  return out


# ------------------------------------------------------------------ reading


@dataclasses.dataclass(frozen=True)
class SegmentationInfo:
  """What `make_segmentation_source` found."""
  name: str
  path: str
  split: str
  kind: str
  num_examples: int
  categories: tuple  # ({id, name, isthing, color}, ...) by category index
  has_proposals: bool

  @property
  def class_names(self) -> list[str]:
    return [c['name'] for c in self.categories]


def is_segmentation_dir(path: str) -> bool:
  return (folder.is_dataset_dir(path)
          and os.path.isfile(os.path.join(path, META_FILE)))


def make_segmentation_source(data_config):
  """Returns (random-access source of raw records, SegmentationInfo)."""
  name = data_config.name
  if name == SAMPLE_NAME:
    path = sample_segmentation_dir()
  elif name == 'segmentation':
    path = data_config.get('path', '')
    if not path:
      raise UserError('data.path: empty; set it to a segmentation dataset '
                      '(build one with: python data_prep/'
                      'build_segmentation_dataset.py --format=... --src=DIR '
                      '--split=val --out=DIR).')
    path = os.path.abspath(os.path.expanduser(path))
  else:
    raise UserError(f'data.name: {name!r} is not a segmentation dataset; use '
                    f'{SAMPLE_NAME} or segmentation (with data.path).')
  if not is_segmentation_dir(path):
    raise UserError(f'data.path: no segmentation dataset at {path!r} (build '
                    'one with: python data_prep/build_segmentation_dataset.py'
                    f' --format=... --src=DIR --split=val --out={path}).')
  with open(os.path.join(path, META_FILE)) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT or meta.get('version') != 1:
    raise UserError(f'data.path: {path!r} holds a {meta.get("format")} '
                    f'v{meta.get("version")} dataset; this code reads '
                    f'{FORMAT} v1 (rebuild it).')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(path)
  source = builder.as_data_source(meta['split'])
  info = SegmentationInfo(
      name=name, path=path, split=meta['split'], kind=meta['kind'],
      num_examples=len(source), categories=tuple(meta['categories']),
      has_proposals=bool(meta['proposals']))
  return source, info


def decode_example(raw: dict) -> dict:
  """A record as arrays: image uint8 [H, W, 3], ids int32 [H, W], ...

  Keys: image, ids, segment_ids, segment_classes, segment_iscrowd, index,
  image_id (str), proposals (`Proposals`, or None if none were stored).
  """
  return {
      'image': decode_image(raw['image']),
      'ids': decode_ids(raw['panoptic']),
      'segment_ids': np.asarray(raw['segment_ids'], np.int32),
      'segment_classes': np.asarray(raw['segment_classes'], np.int32),
      'segment_iscrowd': np.asarray(raw['segment_iscrowd'], bool),
      'index': int(raw['index']),
      'image_id': _text(raw['image_id']),
      'proposals': (_proposals_from_bytes(raw['proposals'])
                    if 'proposals' in raw else None)}


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def semantic_map(ids, segment_ids, segment_classes) -> np.ndarray:
  """int32 [H, W] class of every pixel; IGNORE_LABEL where void.

  Crowd segments keep their class, as in COCO's semantic conversion.
  """
  lookup = dict(zip(np.asarray(segment_ids).tolist(),
                    np.asarray(segment_classes).tolist()))
  present, inverse = np.unique(ids, return_inverse=True)
  classes = np.array([lookup.get(i, IGNORE_LABEL) for i in present.tolist()],
                     np.int32)
  return classes[inverse].reshape(np.shape(ids))


# --------------------------------------------------------------- transform


@dataclasses.dataclass(frozen=True)
class _Settings:
  size: int
  train: bool
  flip: bool
  scale_range: tuple[float, float]
  max_segments: int
  max_proposals: int
  use_stored: bool


def _settings(data_config, info: SegmentationInfo, train: bool) -> _Settings:
  h, w = folder.parse_resolution(data_config.resolution, 'data.resolution')
  if h != w:
    raise UserError(f'data.resolution: segmentation batches are square; got '
                    f'{h}x{w}, use one int.')
  lo, hi = (float(v) for v in data_config.get('scale_range', (1.0, 1.0)))
  if not 0 < lo <= hi:
    raise UserError(f'data.scale_range: ({lo}, {hi}) must be 0 < lo <= hi.')
  k = int(data_config.get('max_segments', 100))
  m = int(data_config.get('max_proposals', 100))
  if k < 1 or m < 1:
    raise UserError(f'data.max_segments / data.max_proposals: {k} / {m}; '
                    'both must be at least 1.')
  mode = data_config.get('proposals', 'auto')
  if mode not in PROPOSAL_MODES:
    raise UserError(f'data.proposals: {mode!r} is not one of '
                    f'{", ".join(PROPOSAL_MODES)}.')
  if mode == 'stored' and not info.has_proposals:
    raise UserError(f'data.proposals: "stored", but {info.path!r} has no '
                    'proposals; rebuild it with --proposals=DIR or use "gt".')
  return _Settings(size=h, train=train,
                   flip=train and bool(data_config.get('random_flip', False)),
                   scale_range=(lo, hi), max_segments=k, max_proposals=m,
                   use_stored=info.has_proposals and mode != 'gt')


class _Geometry(NamedTuple):
  new_hw: tuple[int, int]  # size after the resize
  top: int
  left: int
  flip: bool


def _geometry(hw, s: _Settings, rng) -> _Geometry:
  h, w = hw
  if s.train:
    # Drawn in a fixed order whatever the image, so the stream stays aligned.
    factor, fy, fx, flip = rng.uniform(*s.scale_range), *rng.random(3)
    scale = s.size / min(h, w) * factor
  else:
    scale, fy, fx, flip = s.size / max(h, w), 0.0, 0.0, 1.0
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  return _Geometry((nh, nw), int(fy * (max(nh - s.size, 0) + 1)),
                   int(fx * (max(nw - s.size, 0) + 1)),
                   s.flip and flip < 0.5)


def _warp(img: Image.Image, g: _Geometry, size: int, resample, fill,
          dtype) -> np.ndarray:
  """Resize, crop, flip, pad to size x size (pad at the bottom / right)."""
  nh, nw = g.new_hw
  if img.size != (nw, nh):
    img = img.resize((nw, nh), resample)
  a = np.asarray(img)[g.top:g.top + size, g.left:g.left + size]
  if g.flip:
    a = a[:, ::-1]
  out = np.full((size, size) + a.shape[2:], fill, dtype)
  out[:a.shape[0], :a.shape[1]] = a
  return out


def _proposal_logits(proposals: Proposals, g: _Geometry, s: _Settings):
  masks, scores = proposals
  order = np.arange(len(masks))
  if len(masks) > s.max_proposals and scores is not None:
    order = np.argsort(-scores, kind='stable')
  order = order[:s.max_proposals]
  logits = np.full((s.max_proposals, s.size, s.size), -MASK_LOGIT, np.float32)
  kept_scores = np.zeros((s.max_proposals,), np.float32)
  for row, i in enumerate(order):
    if masks.dtype == np.bool_:
      binary = _warp(Image.fromarray(masks[i].astype(np.uint8)), g, s.size,
                     Image.Resampling.NEAREST, 0, np.uint8)
      logits[row] = np.where(binary > 0, MASK_LOGIT, -MASK_LOGIT)
    else:
      logits[row] = _warp(Image.fromarray(masks[i].astype(np.float32)), g,
                          s.size, Image.Resampling.BILINEAR, -MASK_LOGIT,
                          np.float32)
    kept_scores[row] = 1.0 if scores is None else scores[i]
  valid = (logits > 0).any(axis=(1, 2))
  valid[len(order):] = False
  return logits, valid, np.where(valid, kept_scores, 0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Transform:
  """Raw record -> one example of a batch (a grain map or random map)."""
  s: _Settings

  def __call__(self, raw, rng=None):
    s = self.s
    with Image.open(io.BytesIO(raw['image'])) as img:
      image = img.convert('RGB')
    hw = (image.height, image.width)
    g = _geometry(hw, s, rng)
    pixels = _warp(image, g, s.size, Image.Resampling.BILINEAR, 0, np.uint8)
    ids = _warp(Image.fromarray(decode_ids(raw['panoptic'])), g, s.size,
                Image.Resampling.NEAREST, 0, np.int32)

    # Targets: visible non-crowd segments; the K largest if there are more.
    seg_ids = np.asarray(raw['segment_ids'])
    present, counts = np.unique(ids, return_counts=True)
    area = dict(zip(present.tolist(), counts.tolist()))
    areas = np.array([0 if crowd else area.get(i, 0) for i, crowd in zip(
        seg_ids.tolist(), raw['segment_iscrowd'])], np.int64)
    rows = np.flatnonzero(areas > 0)
    if len(rows) > s.max_segments:
      rows = np.sort(rows[np.argsort(-areas[rows], kind='stable')
                          [:s.max_segments]])
    k = len(rows)
    target_masks = np.zeros((s.max_segments, s.size, s.size), bool)
    target_masks[:k] = ids[None] == seg_ids[rows][:, None, None]
    target_classes = np.full((s.max_segments,), -1, np.int32)
    target_classes[:k] = np.asarray(raw['segment_classes'])[rows]
    target_valid = np.arange(s.max_segments) < k

    nh, nw = g.new_hw
    example = {
        'image': pixels,
        'target_masks': target_masks, 'target_classes': target_classes,
        'target_valid': target_valid,
        'index': np.int32(raw['index']),
        'valid_hw': np.array([min(nh, s.size), min(nw, s.size)], np.int32),
        'orig_hw': np.array(hw, np.int32)}
    # Ground-truth proposals are made per batch by `_Finish`: one pass over
    # the largest array instead of a fill, a copy and a stack per example.
    if s.use_stored:
      (example['proposals'], example['proposal_valid'],
       example['proposal_scores']) = _proposal_logits(
           _proposals_from_bytes(raw['proposals']), g, s)
    return example


@dataclasses.dataclass(frozen=True)
class _Finish:
  """Batch in the main process: image to [-1, 1] (padding exactly 0),
  ground-truth proposals if none are stored, arrays owned (not views of
  worker shared memory)."""
  max_proposals: int

  def __call__(self, batch):
    batch = {k: v if v.flags.owndata else np.array(v)
             for k, v in batch.items()}
    image = batch['image'].astype(np.float32) * np.float32(1 / 127.5) - 1
    for b, (h, w) in enumerate(batch['valid_hw']):
      image[b, h:] = 0
      image[b, :, w:] = 0
    batch['image'] = image
    if 'proposals' not in batch:
      m = self.max_proposals
      masks, valid = batch['target_masks'][:, :m], batch['target_valid'][:, :m]
      extra = m - masks.shape[1]
      if extra > 0:
        masks = np.pad(masks, ((0, 0), (0, extra), (0, 0), (0, 0)))
        valid = np.pad(valid, ((0, 0), (0, extra)))
      batch['proposals'] = np.where(masks, np.float32(MASK_LOGIT),
                                    np.float32(-MASK_LOGIT))
      batch['proposal_valid'] = valid
      batch['proposal_scores'] = valid.astype(np.float32)
    return batch


# ---------------------------------------------------------------- iterators


def make_segmentation_iterator(data_config, *, local_batch_size: int,
                               seed: int = 0, train: bool = True,
                               process_index: int = 0,
                               process_count: int = 1
                               ) -> pipeline.DataIterator:
  """Batches of this process's shard (see the module docstring).

  train=True: infinite, reshuffled every epoch, augmented; the stream is the
  same for any process count. train=False: one pass in dataset order over
  this process's records (index p, p + P, ...), the last batch may be
  smaller.
  """
  source, info = make_segmentation_source(data_config)
  # pylint: disable=protected-access  (the image pipeline's own machinery)
  pipeline._check_layout(info, local_batch_size, process_index, process_count)
  s = _settings(data_config, info, train)
  transform = _Transform(s)
  settings = {'kind': 'segmentation_train' if train else 'segmentation_eval',
              'num_examples': info.num_examples,
              **{k: v for k, v in dataclasses.asdict(s).items()
                 if k != 'train'},
              'worker_count': int(data_config.get('worker_count', 0))}
  if train:
    ds = grain.MapDataset.source(source).shuffle(
        seed=pipeline._seed32(seed, 0)).repeat()
    ds = ds.random_map(transform, seed=pipeline._seed32(seed, 1))
    ds = ds.batch(local_batch_size)[process_index::process_count]
    settings.update(seed=seed,
                    global_batch_size=local_batch_size * process_count)
  else:
    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.map(transform).batch(local_batch_size, drop_remainder=False)
    settings.update(local_batch_size=local_batch_size,
                    process_count=process_count)
  ds = pipeline._iter_dataset(ds, data_config, finish=_Finish(s.max_proposals))
  return pipeline.DataIterator(ds, settings)


def example_segmentation_batch(data_config, batch_size: int) -> dict:
  """Zeros shaped and typed like a batch of `batch_size`, reading no data."""
  size, _ = folder.parse_resolution(data_config.resolution, 'data.resolution')
  k = int(data_config.get('max_segments', 100))
  m = int(data_config.get('max_proposals', 100))
  b = batch_size
  return {
      'image': np.zeros((b, size, size, 3), np.float32),
      'target_masks': np.zeros((b, k, size, size), bool),
      'target_classes': np.zeros((b, k), np.int32),
      'target_valid': np.zeros((b, k), bool),
      'proposals': np.zeros((b, m, size, size), np.float32),
      'proposal_valid': np.zeros((b, m), bool),
      'proposal_scores': np.zeros((b, m), np.float32),
      'index': np.zeros((b,), np.int32),
      'valid_hw': np.zeros((b, 2), np.int32),
      'orig_hw': np.zeros((b, 2), np.int32)}


def inference_example(image: Image.Image, proposals: Proposals, size: int, max_proposals: int) -> dict:
  """One image and its proposals as the eval transform makes them: the longer
  side resized to `size`, padded at the bottom / right; keys image [S, S, 3] in
  [-1, 1], proposals [M, S, S] logits, proposal_valid [M], valid_hw (h, w)."""
  s = _Settings(size=size, train=False, flip=False, scale_range=(1.0, 1.0), max_segments=1,
                max_proposals=max_proposals, use_stored=True)
  g = _geometry((image.height, image.width), s, None)
  pixels = _warp(image.convert('RGB'), g, size, Image.Resampling.BILINEAR, 0, np.uint8)
  logits, valid, _ = _proposal_logits(proposals, g, s)
  nh, nw = g.new_hw
  h, w = min(nh, size), min(nw, size)
  pixels = pixels.astype(np.float32) / 127.5 - 1
  pixels[h:], pixels[:, w:] = 0, 0
  return {'image': pixels, 'proposals': logits, 'proposal_valid': valid, 'valid_hw': (h, w)}
