"""Per-image post-processing of mask-classification outputs (host side, numpy).

Inputs are one image's class logits [M, C+1] (last = no object) and mask logits [M, H, W]
already resized to the output resolution. The rules follow MaskCLIP's released inference
(Mask2Former's): semantic = Σ_m p(c|m)·σ(mask_m); instance = top-k (query, class) pairs
scored by class probability × mean mask probability inside the mask; panoptic = keep
queries whose best class is an object with probability > object_mask_threshold, give each
pixel to the query with the largest score·σ(mask), drop segments that keep less than
overlap_threshold of their own σ ≥ 0.5 area, and merge all segments of one stuff class.
"""

import json
import os

import numpy as np
from PIL import Image

from visgen_jax import image_io
from visgen_jax.errors import UserError

# Released MaskCLIP COCO config (configs/coco/maskformer2_R50_bs16_50ep.yaml) and
# detectron2's TEST.DETECTIONS_PER_IMAGE.
OBJECT_MASK_THRESHOLD = 0.5
OVERLAP_THRESHOLD = 0.5
TOPK_PER_IMAGE = 100


def _softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x):
  return 0.5 * (np.tanh(0.5 * x) + 1.0)  # no overflow warning for large |x|


def _checked(class_logits, mask_logits):
  class_logits = np.asarray(class_logits, np.float32)
  mask_logits = np.asarray(mask_logits, np.float32)
  if class_logits.ndim != 2 or mask_logits.ndim != 3:
    raise UserError(f'expected class logits [M, C+1] and mask logits [M, H, W] for one image, '
                    f'got {class_logits.shape} and {mask_logits.shape}.')
  if class_logits.shape[0] != mask_logits.shape[0]:
    raise UserError(f'{class_logits.shape[0]} class predictions but {mask_logits.shape[0]} '
                    'masks; they must match one to one.')
  if class_logits.shape[1] < 2:
    raise UserError('class logits need at least one class plus "no object"; the class list '
                    'is empty.')
  return class_logits, mask_logits


def semantic_inference(class_logits, mask_logits):
  """Per-class scores [C, H, W] = Σ_m softmax(class_m)[c]·σ(mask_m); zeros with no masks."""
  class_logits, mask_logits = _checked(class_logits, mask_logits)
  probs = _softmax(class_logits)[:, :-1]
  return np.einsum('mc,mhw->chw', probs, _sigmoid(mask_logits))


def instance_inference(class_logits, mask_logits, topk: int = TOPK_PER_IMAGE, is_thing=None):
  """Top-k instances: (masks bool [k, H, W], scores float32 [k], labels int32 [k]).

  Every (query, class) pair competes on its class probability (ties: lower query, then
  lower class first, which is also the output order); the returned score is that
  probability times the mean σ(mask) over the binary mask (logit > 0). With is_thing [C]
  given (panoptic datasets), stuff-class pairs are dropped after the top-k, as in the
  public code. No masks give empty arrays.
  """
  class_logits, mask_logits = _checked(class_logits, mask_logits)
  num_classes = class_logits.shape[1] - 1
  if topk < 1:
    raise UserError(f'topk={topk} must be at least 1.')
  probs = _softmax(class_logits)[:, :-1].reshape(-1)
  k = min(topk, probs.size)
  top = np.argsort(-probs, kind='stable')[:k]
  queries, labels = top // num_classes, (top % num_classes).astype(np.int32)
  class_scores = probs[top]
  if is_thing is not None:
    is_thing = np.asarray(is_thing, bool)
    if is_thing.shape != (num_classes,):
      raise UserError(f'is_thing has shape {is_thing.shape}; expected ({num_classes},).')
    keep = is_thing[labels]
    queries, labels, class_scores = queries[keep], labels[keep], class_scores[keep]
  logits = mask_logits[queries]
  masks = logits > 0
  mask_scores = (_sigmoid(logits) * masks).sum((1, 2)) / (masks.sum((1, 2)) + 1e-6)
  return masks, (class_scores * mask_scores).astype(np.float32), labels


def panoptic_inference(class_logits, mask_logits, is_thing,
                       object_mask_threshold: float = OBJECT_MASK_THRESHOLD,
                       overlap_threshold: float = OVERLAP_THRESHOLD):
  """Panoptic map int32 [H, W] (0 = no segment) and its segments, ids 1, 2, ….

  is_thing [C] bool per class. Each segment is a dict {id, category_id (class index),
  isthing, score (class probability; the best one of a merged stuff segment), area
  (pixels)}. No query above the threshold, or none keeping enough of its mask, gives an
  all-zero map and no segments.
  """
  class_logits, mask_logits = _checked(class_logits, mask_logits)
  num_classes = class_logits.shape[1] - 1
  is_thing = np.asarray(is_thing, bool)
  if is_thing.shape != (num_classes,):
    raise UserError(f'is_thing has shape {is_thing.shape}; expected ({num_classes},), one flag '
                    'per class.')
  probs = _softmax(class_logits)
  scores, labels = probs.max(-1), probs.argmax(-1)
  keep = (labels != num_classes) & (scores > object_mask_threshold)
  scores, labels = scores[keep], labels[keep]
  masks = _sigmoid(mask_logits[keep])
  panoptic = np.zeros(mask_logits.shape[1:], np.int32)
  if not keep.any():
    return panoptic, []

  owner = (scores[:, None, None] * masks).argmax(0)
  segments, stuff_segment = [], {}
  for k, (score, label) in enumerate(zip(scores, labels)):
    label = int(label)
    foreground = masks[k] >= 0.5
    owned = owner == k
    region = owned & foreground
    original_area = foreground.sum()
    if not region.any() or owned.sum() < overlap_threshold * original_area:
      continue
    if not is_thing[label] and label in stuff_segment:
      segment = stuff_segment[label]
      segment['score'] = max(segment['score'], float(score))
    else:
      segment = {'id': len(segments) + 1, 'category_id': label, 'isthing': bool(is_thing[label]),
                 'score': float(score)}
      segments.append(segment)
      if not is_thing[label]:
        stuff_segment[label] = segment
    panoptic[region] = segment['id']
  areas = np.bincount(panoptic.reshape(-1), minlength=len(segments) + 1)
  for segment in segments:
    segment['area'] = int(areas[segment['id']])
  return panoptic, segments


def id_to_rgb(ids):
  """COCO panoptic colours of segment ids [H, W] → uint8 [H, W, 3], id = R + 256·G + 256²·B."""
  ids = np.asarray(ids, np.int64)
  if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256 ** 3:
    raise UserError('panoptic segment ids must lie in [0, 256³) to fit an RGB PNG.')
  return np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2], axis=-1).astype(np.uint8)


def rgb_to_id(rgb):
  """Inverse of `id_to_rgb`: uint8 [H, W, 3] → int32 [H, W]."""
  rgb = np.asarray(rgb, np.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]


def write_coco_panoptic(path, panoptic_map, segments_info, image_id, category_ids=None):
  """Writes the COCO-panoptic PNG of one image at path; returns its JSON annotation entry.

  The entry is {image_id, file_name (the PNG's base name), segments_info: [{id,
  category_id, iscrowd: 0, area, bbox [x, y, w, h]}]}; category_ids maps class indices to
  dataset category ids (default: the index itself). Segments absent from the map are left
  out (COCO forbids them).
  """
  panoptic_map = np.asarray(panoptic_map)
  if panoptic_map.ndim != 2:
    raise UserError(f'panoptic map must be [H, W], got shape {panoptic_map.shape}.')
  rgb = id_to_rgb(panoptic_map)
  image_io.write_atomically(path, lambda tmp: Image.fromarray(rgb, 'RGB').save(tmp, format='PNG'))
  entries = []
  for segment in segments_info:
    ys, xs = np.nonzero(panoptic_map == segment['id'])
    if ys.size == 0:
      continue
    category = int(segment['category_id'])
    entries.append({
        'id': int(segment['id']),
        'category_id': int(category_ids[category]) if category_ids is not None else category,
        'iscrowd': 0,
        'area': int(ys.size),
        'bbox': [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                 int(ys.max() - ys.min() + 1)],
    })
  return {'image_id': image_id, 'file_name': os.path.basename(path), 'segments_info': entries}


def read_coco_panoptic(path):
  """Segment ids int32 [H, W] of a COCO-panoptic PNG."""
  with Image.open(path) as image:
    return rgb_to_id(np.asarray(image.convert('RGB')))


def write_coco_panoptic_json(path, annotations, categories):
  """The COCO-panoptic JSON {annotations, categories} for PNGs written by `write_coco_panoptic`."""
  payload = json.dumps({'annotations': annotations, 'categories': categories})

  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(payload)

  image_io.write_atomically(path, write)
