"""Segmentation datasets on disk: the record format and the proposals format.

Datasets are written by data_prep/build_segmentation_dataset.py (COCO
panoptic, ADE20K-150, ADE20K-847, PASCAL Context 59 / 459) or synthesised
(`data.name='seg_sample'`, sample.py), always with
`writer.write_segmentation_dataset`; source.py reads them.

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
"""

import io
import os
import zipfile
from typing import NamedTuple

import numpy as np
from PIL import Image

from visgen_jax.data import folder
from visgen_jax.errors import UserError

META_FILE = 'segmentation.json'
FORMAT = 'visgen_jax.segmentation'
IGNORE_LABEL = -1

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


def proposals_bytes(proposals: Proposals) -> bytes:
  buffer = io.BytesIO()
  arrays = {'masks': proposals.masks}
  if proposals.scores is not None:
    arrays['scores'] = proposals.scores
  np.savez_compressed(buffer, **arrays)
  return buffer.getvalue()


def proposals_from_bytes(data: bytes) -> Proposals:
  with np.load(io.BytesIO(data), allow_pickle=False) as f:
    return Proposals(f['masks'], f['scores'] if 'scores' in f.files else None)


# ----------------------------------------------------------------- records


def is_segmentation_dir(path: str) -> bool:
  return (folder.is_dataset_dir(path)
          and os.path.isfile(os.path.join(path, META_FILE)))


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
      'proposals': (proposals_from_bytes(raw['proposals'])
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

