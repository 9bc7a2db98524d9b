"""Segmentation sources: 'seg_sample' (sample.py, built on first use) and
'segmentation' (data.path, a dataset in the format of records.py).

  info = make_segmentation_source(config.data)[1]    # info.categories: names
  it = make_segmentation_iterator(config.data, local_batch_size=b, seed=0)
  batch = next(it)            # see "Batches" below
  state = it.get_state()      # it.set_state(state) resumes exactly
  pipeline.example_batch(config.data, b)    # zeros shaped like a batch

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
it is smaller, then flipped left-right with probability 1/2 if random_flip
(the pipeline's flip: image, masks and proposals together, the padding stays
at the bottom / right). Eval: resized so its longer side is S (all of it
visible), padded bottom / right, never flipped. Targets are the non-crowd
segments still visible after that, in record order; with more than K, the K
largest (still in record order). Stored proposals keep their order; with more
than M, the M best in descending score order (the first M if there are no
scores). In ground-truth mode proposal i is target i.

The training stream is the one of `pipeline.make_train_iterator`: one global
shuffled order, each process reads its slice of every global batch, and the
saved state resumes exactly.
"""

import abc
import dataclasses
import io
import json
import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from visgen_jax.data import folder
from visgen_jax.data import pipeline
from visgen_jax.data import registry
from visgen_jax.data.segmentation import records
from visgen_jax.data.segmentation import sample
from visgen_jax.errors import UserError

# Binary masks and ground truth become logits of this size: sigmoid(10) is
# within 5e-5 of 1, and it stays exact in float16.
MASK_LOGIT = 10.0
PROPOSAL_MODES = ('auto', 'gt', 'stored')
BUILD_COMMAND = ('python data_prep/build_segmentation_dataset.py '
                 '--format=... --src=DIR --split=val --out={out}')


@dataclasses.dataclass(frozen=True)
class SegmentationInfo(registry.SourceInfo):
  """What `make_segmentation_source` found."""
  split: str
  kind: str
  categories: tuple  # ({id, name, isthing, color}, ...) by category index
  has_proposals: bool

  @property
  def class_names(self) -> list[str]:
    return [c['name'] for c in self.categories]


# --------------------------------------------------------------- transform


class _Options(NamedTuple):
  """config.data as this module reads it."""
  size: int
  scale_range: tuple[float, float]
  max_segments: int
  max_proposals: int
  proposals: str


def _options(data_config) -> _Options:
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
  return _Options(h, (lo, hi), k, m, mode)


@dataclasses.dataclass(frozen=True)
class _Settings:
  size: int
  train: bool
  scale_range: tuple[float, float]
  max_segments: int
  max_proposals: int
  use_stored: bool


def _settings(data_config, info: SegmentationInfo, train: bool) -> _Settings:
  o = _options(data_config)
  if o.proposals == 'stored' and not info.has_proposals:
    raise UserError(f'data.proposals: "stored", but {info.path!r} has no '
                    'proposals; rebuild it with --proposals=DIR or use "gt".')
  return _Settings(size=o.size, train=train, scale_range=o.scale_range,
                   max_segments=o.max_segments, max_proposals=o.max_proposals,
                   use_stored=info.has_proposals and o.proposals != 'gt')


class _Geometry(NamedTuple):
  new_hw: tuple[int, int]  # size after the resize
  top: int
  left: int


def _geometry(hw, s: _Settings, rng) -> _Geometry:
  h, w = hw
  if s.train:
    # Drawn in a fixed order whatever the image, so the stream stays aligned
    # (the pipeline's flip draws next).
    factor, fy, fx = rng.uniform(*s.scale_range), *rng.random(2)
    scale = s.size / min(h, w) * factor
  else:
    scale, fy, fx = s.size / max(h, w), 0.0, 0.0
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  return _Geometry((nh, nw), int(fy * (max(nh - s.size, 0) + 1)),
                   int(fx * (max(nw - s.size, 0) + 1)))


def _warp(img: Image.Image, g: _Geometry, size: int, resample, fill,
          dtype) -> np.ndarray:
  """Resize, crop, pad to size x size (pad at the bottom / right)."""
  nh, nw = g.new_hw
  if img.size != (nw, nh):
    img = img.resize((nw, nh), resample)
  a = np.asarray(img)[g.top:g.top + size, g.left:g.left + size]
  out = np.full((size, size) + a.shape[2:], fill, dtype)
  out[:a.shape[0], :a.shape[1]] = a
  return out


def _proposal_logits(proposals: records.Proposals, g: _Geometry,
                     s: _Settings):
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
    ids = _warp(Image.fromarray(records.decode_ids(raw['panoptic'])), g, s.size,
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
           records.proposals_from_bytes(raw['proposals']), g, s)
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



# ------------------------------------------------------------------ sources


class _Segmentation(registry.Source):
  """A dataset in the format of records.py, at `dataset_dir(data_config)`."""
  keys = ('resolution', 'scale_range', 'max_segments', 'max_proposals',
          'proposals')

  @abc.abstractmethod
  def dataset_dir(self, data_config) -> str:
    """Where the dataset is (a built-in one is built on first use)."""

  def check(self, data_config):
    _options(data_config)

  def open(self, data_config):
    path = self.dataset_dir(data_config)
    if not records.is_segmentation_dir(path):
      raise UserError(f'data.path: no segmentation dataset at {path!r} (build '
                      f'one with: {BUILD_COMMAND.format(out=path)}).')
    with open(os.path.join(path, records.META_FILE)) as f:
      meta = json.load(f)
    if meta.get('format') != records.FORMAT or meta.get('version') != 1:
      raise UserError(f'data.path: {path!r} holds a {meta.get("format")} '
                      f'v{meta.get("version")} dataset; this code reads '
                      f'{records.FORMAT} v1 (rebuild it).')
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder_from_directory(path)
    source = builder.as_data_source(meta['split'])
    info = SegmentationInfo(
        name=self.name, path=path, split=meta['split'], kind=meta['kind'],
        num_examples=len(source), categories=tuple(meta['categories']),
        has_proposals=bool(meta['proposals']))
    return source, info

  def spec(self, data_config):
    s, _, k, m, _ = _options(data_config)
    feature = registry.Feature
    return {
        'image': feature((s, s, 3), np.float32, width_axis=1),
        'target_masks': feature((k, s, s), np.bool_, width_axis=2),
        'target_classes': feature((k,), np.int32),
        'target_valid': feature((k,), np.bool_),
        'proposals': feature((m, s, s), np.float32, width_axis=2),
        'proposal_valid': feature((m,), np.bool_),
        'proposal_scores': feature((m,), np.float32),
        'index': feature((), np.int32),
        'valid_hw': feature((2,), np.int32),
        'orig_hw': feature((2,), np.int32)}

  def transform(self, data_config, info, train):
    return _Transform(_settings(data_config, info, train))

  def finish(self, data_config, info):
    return _Finish(_options(data_config).max_proposals)


@registry.register('segmentation')
class SegmentationDataset(_Segmentation):
  """A dataset made by data_prep/build_segmentation_dataset.py, at data.path."""
  keys = _Segmentation.keys + ('path',)

  def check(self, data_config):
    super().check(data_config)
    self.dataset_dir(data_config)

  def dataset_dir(self, data_config):
    return registry.dataset_path(data_config, BUILD_COMMAND.format(out='DIR'))


@registry.register(sample.SAMPLE_NAME)
class SampleSegmentation(_Segmentation):
  """The synthetic set of sample.py."""

  def dataset_dir(self, data_config):
    return sample.sample_segmentation_dir()


def _segmentation_source(data_config) -> _Segmentation:
  source = registry.validate(data_config)
  if not isinstance(source, _Segmentation):
    raise UserError(f'data.name: {source.name!r} is not a segmentation '
                    f'dataset; use {sample.SAMPLE_NAME} or segmentation (with '
                    'data.path).')
  return source


def make_segmentation_source(data_config):
  """Returns (random-access source of raw records, SegmentationInfo)."""
  return _segmentation_source(data_config).open(data_config)


def make_segmentation_iterator(data_config, *, local_batch_size: int,
                               seed: int = 0, train: bool = True,
                               process_index: int = 0,
                               process_count: int = 1
                               ) -> pipeline.DataIterator:
  """Batches of this process's shard (see the module docstring).

  train=True: `pipeline.make_train_iterator`, infinite, reshuffled every
  epoch, augmented; the stream is the same for any process count.
  train=False: `pipeline.make_eval_iterator`, one pass in dataset order over
  this process's records (index p, p + P, ...), the last batch may be
  smaller.
  """
  _segmentation_source(data_config)
  if train:
    return pipeline.make_train_iterator(
        data_config, local_batch_size=local_batch_size, seed=seed,
        process_index=process_index, process_count=process_count)
  return pipeline.make_eval_iterator(
      data_config, local_batch_size=local_batch_size,
      process_index=process_index, process_count=process_count)


def inference_example(image: Image.Image, proposals: records.Proposals, size: int, max_proposals: int) -> dict:
  """One image and its proposals as the eval transform makes them: the longer
  side resized to `size`, padded at the bottom / right; keys image [S, S, 3] in
  [-1, 1], proposals [M, S, S] logits, proposal_valid [M], valid_hw (h, w)."""
  s = _Settings(size=size, train=False, scale_range=(1.0, 1.0), max_segments=1,
                max_proposals=max_proposals, use_stored=True)
  g = _geometry((image.height, image.width), s, None)
  pixels = _warp(image.convert('RGB'), g, size, Image.Resampling.BILINEAR, 0, np.uint8)
  logits, valid, _ = _proposal_logits(proposals, g, s)
  nh, nw = g.new_hw
  h, w = min(nh, size), min(nw, size)
  pixels = pixels.astype(np.float32) / 127.5 - 1
  pixels[h:], pixels[:, w:] = 0, 0
  return {'image': pixels, 'proposals': logits, 'proposal_valid': valid, 'valid_hw': (h, w)}
