"""The 'segmentation' evaluator and its streaming metrics (update once per image, `merge`
across processes, `compute`).

SemanticMetric  mIoU, frequency-weighted IoU, pixel and mean class accuracy from a confusion
                matrix (detectron2's SemSegEvaluator definitions).
PanopticMetric  PQ, SQ, RQ over all, thing and stuff categories with the rules of the COCO
                panopticapi (pq_compute): IoU > 0.5 matches, VOID pixels (id 0 in the ground
                truth) left out of the union, crowd regions and VOID absorbing unmatched
                predictions that lie more than half inside them.
InstanceMetric  mask AP, AP50, AP75 (and by area) with pycocotools' COCOeval, iouType='segm'.
SegmentationMetrics  the three, fed one image's mask-classification output at a time.

All values are fractions in [0, 1] (not percentages).
"""

import contextlib
import io
import itertools
import os

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from visgen_jax.data import segmentation as seg_data
from visgen_jax.errors import UserError
from visgen_jax.eval import merge_over_processes, process_local, register
from visgen_jax.segmentation import postprocess

# Packs (ground-truth id, predicted id) into one integer, as panopticapi does.
_OFFSET = 256 ** 3


def _label_map(name, array, shape=None):
  array = np.asarray(array)
  if array.ndim != 2:
    raise UserError(f'{name} must be a 2-D [H, W] map, got shape {array.shape}.')
  if shape is not None and array.shape != shape:
    raise UserError(f'{name} has shape {array.shape} but the ground truth has {shape}; '
                    'resize the prediction to the label size first.')
  if not np.issubdtype(array.dtype, np.integer):
    raise UserError(f'{name} must hold integer labels, got dtype {array.dtype}.')
  return array.astype(np.int64)


class SemanticMetric:
  """Confusion-matrix metrics over classes [0, num_classes); ignore_label pixels skipped."""

  def __init__(self, num_classes: int, ignore_label: int = 255):
    if num_classes < 1:
      raise UserError(f'SemanticMetric needs num_classes >= 1, got {num_classes}.')
    self.num_classes = num_classes
    self.ignore_label = ignore_label
    self.confusion = np.zeros((num_classes, num_classes), np.int64)  # [ground truth, prediction]

  def update(self, prediction, label):
    """prediction [H, W] class ids; label [H, W] class ids or ignore_label."""
    label = _label_map('label', label)
    prediction = _label_map('prediction', prediction, label.shape)
    keep = label != self.ignore_label
    label, prediction = label[keep], prediction[keep]
    c = self.num_classes
    if label.size and (label.min() < 0 or label.max() >= c):
      raise UserError(f'label holds a class outside [0, {c}) other than '
                      f'ignore_label={self.ignore_label}.')
    if prediction.size and (prediction.min() < 0 or prediction.max() >= c):
      raise UserError(f'prediction holds a class outside [0, {c}).')
    self.confusion += np.bincount(label * c + prediction, minlength=c * c).reshape(c, c)

  def merge(self, other: 'SemanticMetric'):
    self.confusion += other.confusion

  def per_class_iou(self):
    """IoU per class [C]; NaN for a class absent from both labels and predictions."""
    tp = np.diag(self.confusion).astype(np.float64)
    union = self.confusion.sum(0) + self.confusion.sum(1) - tp
    with np.errstate(invalid='ignore', divide='ignore'):
      return np.where(union > 0, tp / union, np.nan)

  def compute(self):
    """{miou, fwiou, pixel_acc, mean_acc}; mIoU averages classes seen in labels or predictions."""
    gt_pixels = self.confusion.sum(1)
    if gt_pixels.sum() == 0:
      raise UserError('SemanticMetric saw no labelled pixel; check ignore_label and the data.')
    tp = np.diag(self.confusion).astype(np.float64)
    iou = self.per_class_iou()
    present = gt_pixels > 0
    frequency = gt_pixels / gt_pixels.sum()
    return {
        'miou': float(np.nanmean(iou)),
        'fwiou': float((frequency[present] * iou[present]).sum()),
        'pixel_acc': float(tp.sum() / gt_pixels.sum()),
        'mean_acc': float((tp[present] / gt_pixels[present]).mean()),
    }


class PanopticMetric:
  """PQ / SQ / RQ as the COCO panopticapi computes them.

  categories: COCO-style dicts with 'id' and 'isthing' (the ids used as category_id in the
  segments).
  """

  def __init__(self, categories):
    self.isthing = {int(c['id']): bool(c['isthing']) for c in categories}
    if not self.isthing:
      raise UserError('PanopticMetric needs at least one category.')
    # Per category: (image id, IoU) of every match (TP = their number), FP and FN counts. The
    # IoUs are summed in image-id order, so metrics merged from shards of a dataset give exactly
    # the sum of one pass over it.
    self.matched_ious = {c: [] for c in self.isthing}
    self.false = {c: np.zeros(2, np.int64) for c in self.isthing}  # FP, FN
    self.num_images = 0

  def _segments(self, name, segments, id_map):
    by_id = {}
    for segment in segments:
      segment_id, category = int(segment['id']), int(segment['category_id'])
      if category not in self.isthing:
        raise UserError(f'{name} segment {segment_id} has category {category}, which is not '
                        'among the categories given to PanopticMetric.')
      if segment_id == 0 or segment_id in by_id:
        raise UserError(f'{name} segment id {segment_id} is 0 (VOID) or repeated.')
      by_id[segment_id] = dict(category=category, iscrowd=bool(segment.get('iscrowd', 0)),
                               area=0)
    ids, counts = np.unique(id_map, return_counts=True)
    for segment_id, count in zip(ids.tolist(), counts.tolist()):
      if segment_id == 0:
        continue
      if segment_id not in by_id:
        raise UserError(f'{name} map holds segment id {segment_id} with no segment entry.')
      by_id[segment_id]['area'] = count
    return by_id

  def update(self, pred_map, pred_segments, gt_map, gt_segments, image_id=None):
    """Maps are segment ids [H, W] (0 = VOID / unlabelled); segments are dicts with id and
    category_id (and iscrowd for the ground truth). Predicted segments with no pixel are
    ignored. image_id (default: the number of images added before) orders the sums; give it
    when merging metrics fed from one dataset."""
    image_id = self.num_images if image_id is None else int(image_id)
    gt_map = _label_map('ground-truth panoptic map', gt_map)
    pred_map = _label_map('predicted panoptic map', pred_map, gt_map.shape)
    gt = self._segments('ground-truth', gt_segments, gt_map)
    pred = {k: v for k, v in self._segments('predicted', pred_segments, pred_map).items()
            if v['area'] > 0}
    pairs, counts = np.unique(gt_map * _OFFSET + pred_map, return_counts=True)
    overlap = {(int(p // _OFFSET), int(p % _OFFSET)): int(n) for p, n in zip(pairs, counts)}

    matched_gt, matched_pred = set(), set()
    for (gt_id, pred_id), intersection in overlap.items():
      if gt_id not in gt or pred_id not in pred:
        continue
      g, p = gt[gt_id], pred[pred_id]
      if g['iscrowd'] or g['category'] != p['category']:
        continue
      union = p['area'] + g['area'] - intersection - overlap.get((0, pred_id), 0)
      iou = intersection / union
      if iou > 0.5:
        self.matched_ious[g['category']].append((image_id, iou))
        matched_gt.add(gt_id)
        matched_pred.add(pred_id)

    crowd_of = {g['category']: gt_id for gt_id, g in gt.items() if g['iscrowd']}
    for gt_id, g in gt.items():
      if gt_id not in matched_gt and not g['iscrowd']:
        self.false[g['category']][1] += 1
    for pred_id, p in pred.items():
      if pred_id in matched_pred:
        continue
      absorbed = overlap.get((0, pred_id), 0)
      if p['category'] in crowd_of:
        absorbed += overlap.get((crowd_of[p['category']], pred_id), 0)
      if absorbed / p['area'] > 0.5:
        continue
      self.false[p['category']][0] += 1
    self.num_images += 1

  def merge(self, other: 'PanopticMetric'):
    for category, ious in other.matched_ious.items():
      self.matched_ious[category].extend(ious)
      self.false[category] += other.false[category]
    self.num_images += other.num_images

  def per_class(self):
    """{category id: {pq, sq, rq}} for categories with any TP, FP or FN."""
    result = {}
    for category, ious in self.matched_ious.items():
      iou, tp = 0.0, len(ious)
      for _, value in sorted(ious, key=lambda pair: pair[0]):  # one by one: sum() compensates
        iou += value
      fp, fn = self.false[category].tolist()
      if tp + fp + fn == 0:
        continue
      denominator = tp + 0.5 * fp + 0.5 * fn
      result[category] = {'pq': iou / denominator, 'sq': iou / tp if tp else 0.0,
                          'rq': tp / denominator}
    return result

  def compute(self):
    """{pq, sq, rq, n} overall, with _th (things) and _st (stuff) suffixes.

    Each is the mean over categories that occur (TP + FP + FN > 0); n counts them. A group
    with n = 0 reports 0.0.
    """
    if self.num_images == 0:
      raise UserError('PanopticMetric saw no image.')
    per_class = self.per_class()
    result = {}
    for suffix, wanted in (('', None), ('_th', True), ('_st', False)):
      chosen = [v for c, v in per_class.items() if wanted is None or self.isthing[c] == wanted]
      for name in ('pq', 'sq', 'rq'):
        result[name + suffix] = float(np.mean([v[name] for v in chosen])) if chosen else 0.0
      result['n' + suffix] = len(chosen)
    return result


class InstanceMetric:
  """COCO mask AP with pycocotools over classes [0, num_classes)."""

  def __init__(self, num_classes: int):
    if num_classes < 1:
      raise UserError(f'InstanceMetric needs num_classes >= 1, got {num_classes}.')
    self.num_classes = num_classes
    self.images = {}  # image id -> (height, width, ground truths, detections)

  def _encoded(self, name, masks, labels, shape=None):
    from pycocotools import mask as mask_utils
    masks = np.asarray(masks).astype(bool)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if masks.ndim != 3 or masks.shape[0] != labels.shape[0]:
      raise UserError(f'{name} masks must be [N, H, W] with one label each, got masks '
                      f'{masks.shape} and {labels.shape[0]} labels.')
    if shape is not None and masks.shape[1:] != shape:
      raise UserError(f'{name} masks are {masks.shape[1:]} but the ground truth is {shape}.')
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise UserError(f'{name} labels must lie in [0, {self.num_classes}).')
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    return rles, labels.tolist()

  def update(self, pred_masks, pred_scores, pred_labels, gt_masks, gt_labels, gt_iscrowd=None,
             image_id=None):
    """Predictions [N, H, W] bool with scores [N] and labels [N]; ground truth [G, H, W] bool
    with labels [G] and optional iscrowd [G]. COCOeval orders images by id (which decides ties
    between scores of different images); image_id defaults to the number of images added before,
    give it when merging metrics fed from one dataset."""
    gt_masks = np.asarray(gt_masks)
    if gt_masks.ndim != 3:
      raise UserError(f'ground-truth masks must be [G, H, W], got shape {gt_masks.shape}.')
    height, width = gt_masks.shape[1:]
    gt_rles, gt_labels = self._encoded('ground-truth', gt_masks, gt_labels)
    pred_rles, pred_labels = self._encoded('predicted', pred_masks, pred_labels, (height, width))
    pred_scores = np.asarray(pred_scores, np.float64).reshape(-1)
    if pred_scores.shape[0] != len(pred_rles) or not np.isfinite(pred_scores).all():
      raise UserError('predicted scores must be finite, one per predicted mask.')
    crowd = (np.zeros(len(gt_rles), bool) if gt_iscrowd is None
             else np.asarray(gt_iscrowd, bool).reshape(-1))
    if crowd.shape[0] != len(gt_rles):
      raise UserError('gt_iscrowd needs one flag per ground-truth mask.')
    image_id = len(self.images) if image_id is None else int(image_id)
    if image_id in self.images:
      raise ValueError(f'InstanceMetric already holds image id {image_id}.')
    self.images[image_id] = (height, width, list(zip(gt_rles, gt_labels, crowd.tolist())),
                             list(zip(pred_rles, pred_labels, pred_scores.tolist())))

  def merge(self, other: 'InstanceMetric'):
    repeated = sorted(self.images.keys() & other.images.keys())
    if repeated:
      raise ValueError(f'InstanceMetric.merge: both hold image ids {repeated[:5]}; give each image '
                       'its own image_id.')
    self.images.update(other.images)

  def compute(self):
    """{ap, ap50, ap75, ap_small, ap_medium, ap_large}; -1 where COCO finds no ground truth."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    if not self.images:
      raise UserError('InstanceMetric saw no image.')
    images, gts, dets = [], [], []
    for image_id, (height, width, gt, det) in self.images.items():
      images.append({'id': image_id, 'height': height, 'width': width})
      for rle, label, iscrowd in gt:
        gts.append({'id': len(gts) + 1, 'image_id': image_id, 'category_id': label + 1,
                    'segmentation': rle, 'area': float(mask_utils.area(rle)),
                    'bbox': mask_utils.toBbox(rle).tolist(), 'iscrowd': int(iscrowd)})
      for rle, label, score in det:
        # COCOeval treats id 0 as "unmatched", so ids start at 1.
        dets.append({'id': len(dets) + 1, 'image_id': image_id, 'category_id': label + 1,
                     'segmentation': rle, 'area': float(mask_utils.area(rle)),
                     'bbox': mask_utils.toBbox(rle).tolist(), 'score': score, 'iscrowd': 0})
    categories = [{'id': c + 1} for c in range(self.num_classes)]
    with contextlib.redirect_stdout(io.StringIO()):
      coco_gt, coco_dt = COCO(), COCO()
      coco_gt.dataset = {'images': images, 'annotations': gts, 'categories': categories}
      coco_dt.dataset = {'images': images, 'annotations': dets, 'categories': categories}
      coco_gt.createIndex()
      coco_dt.createIndex()
      evaluator = COCOeval(coco_gt, coco_dt, iouType='segm')
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
    names = ('ap', 'ap50', 'ap75', 'ap_small', 'ap_medium', 'ap_large')
    return {name: float(value) for name, value in zip(names, evaluator.stats[:6])}


class SegmentationMetrics:
  """The three metrics over images whose masks a model classified (MaskCLIP's output).

  categories: ({isthing, ...}, ...) by class index; options: the post-processing settings
  object_mask_threshold, overlap_threshold and topk (see segmentation/postprocess.py).
  """

  def __init__(self, categories, options):
    self.is_thing = np.array([bool(c['isthing']) for c in categories])
    self.object_mask_threshold = options.object_mask_threshold
    self.overlap_threshold = options.overlap_threshold
    self.topk = options.topk
    self.semantic = SemanticMetric(len(categories), ignore_label=-1)
    self.panoptic = PanopticMetric([dict(c, id=i) for i, c in enumerate(categories)])
    self.instance = InstanceMetric(len(categories))

  def add(self, logits, masks, gt_masks, gt_classes, image_id):
    """One image: class logits [M, C+1], mask logits [M, H, W]; ground-truth masks [G, H, W]
    bool and their classes [G]; image_id is its index in the dataset."""
    gt_semantic = np.full(gt_masks.shape[1:], -1, np.int32)
    gt_map = np.zeros(gt_masks.shape[1:], np.int32)
    gt_segments = []
    for k, (mask, label) in enumerate(zip(gt_masks, gt_classes)):
      gt_semantic[mask] = label
      gt_map[mask] = k + 1
      gt_segments.append({'id': k + 1, 'category_id': int(label), 'iscrowd': 0})
    if len(logits):
      prediction = postprocess.semantic_inference(logits, masks).argmax(0)
      pan_map, pan_segments = postprocess.panoptic_inference(
          logits, masks, self.is_thing, self.object_mask_threshold, self.overlap_threshold)
      inst_masks, inst_scores, inst_labels = postprocess.instance_inference(
          logits, masks, self.topk, self.is_thing)
    else:  # no proposals: nothing predicted
      prediction = np.zeros(gt_semantic.shape, np.int32)
      pan_map, pan_segments = np.zeros(gt_map.shape, np.int32), []
      inst_masks, inst_scores, inst_labels = (np.zeros((0, *gt_map.shape), bool), np.zeros((0,)),
                                              np.zeros((0,), np.int32))
    self.semantic.update(prediction, gt_semantic)
    self.panoptic.update(pan_map, pan_segments, gt_map, gt_segments, image_id=image_id)
    thing = self.is_thing[gt_classes] if len(gt_classes) else np.zeros((0,), bool)
    self.instance.update(inst_masks, inst_scores, inst_labels, gt_masks[thing], gt_classes[thing],
                         image_id=image_id)

  def merge(self, other: 'SegmentationMetrics'):
    self.semantic.merge(other.semantic)
    self.panoptic.merge(other.panoptic)
    self.instance.merge(other.instance)

  def compute(self):
    """{images, semantic/..., panoptic/..., instance/...}."""
    return {'images': self.panoptic.num_images,
            **{f'semantic/{k}': v for k, v in self.semantic.compute().items()},
            **{f'panoptic/{k}': v for k, v in self.panoptic.compute().items()},
            **{f'instance/{k}': v for k, v in self.instance.compute().items()}}


def evaluate_shard(predict, data_config, categories, options, limit, process_index, process_count):
  """SegmentationMetrics of this process's images among the first `limit` of the dataset
  (dataset order: process_index, process_index + process_count, ...).

  predict(example) -> (class logits, mask logits) of one example of
  `make_segmentation_iterator(data_config, train=False)`, cropped to its valid_hw.
  """
  metrics = SegmentationMetrics(categories, options)
  batches = seg_data.make_segmentation_iterator(data_config, local_batch_size=1, train=False,
                                                process_index=process_index,
                                                process_count=process_count)
  count = len(range(process_index, limit, process_count))
  for batch in tqdm(itertools.islice(batches, count), total=count, desc='eval', unit='image',
                    disable=process_index != 0, leave=False):
    example = {k: v[0] for k, v in batch.items()}
    logits, masks = predict(example)
    h, w = example['valid_hw']
    valid = example['target_valid']
    metrics.add(logits, masks, example['target_masks'][valid][:, :h, :w],
                example['target_classes'][valid], image_id=example['index'])
  batches.close()
  return metrics


def dataset(config, settings, where):
  """(data config, source, info, image count) of the evaluator settings' segmentation dataset:
  settings.path ('' = config.data's dataset) read as config.data says, its first
  settings.max_images images (0 = all). UserErrors name `where`.<key>."""
  if not isinstance(settings.max_images, int) or settings.max_images < 0:
    raise UserError(f'{where}.max_images={settings.max_images!r} is not allowed: use 0 (all '
                    'images) or a positive count.')
  data = ml_collections.ConfigDict(dict(config.data))
  if settings.path:
    if not seg_data.is_segmentation_dir(os.path.abspath(os.path.expanduser(settings.path))):
      raise UserError(f'{where}.path={settings.path!r} is not a segmentation dataset; build one '
                      'with python data_prep/build_segmentation_dataset.py --format=... '
                      '--src=DIR --split=val --out=DIR.')
    data.update(name='segmentation', path=settings.path)
  source, info = seg_data.make_segmentation_source(data)
  return data, source, info, min(settings.max_images or info.num_examples, info.num_examples)


@register('segmentation', path='', max_images=0)
def build_segmentation(config, settings, system, where):
  """mIoU, PQ / SQ / RQ and mask AP of `system.segmenter` on a segmentation dataset
  (data/segmentation/): settings.path ('' = config.data's dataset), read as config.data says
  (resolution, proposals), its first settings.max_images images (0 = all), post-processed with
  config.inference as the system's own commands do."""
  if system.segmenter is None:
    raise UserError(f'{where}.type=segmentation needs a system that segments; '
                    f'config.system={config.system!r} does not.')
  data, _, info, limit = dataset(config, settings, where)

  def evaluate(params, step):
    del step  # inference is deterministic
    predict = system.segmenter(process_local(params), info.class_names)
    shard = evaluate_shard(predict, data, info.categories, config.inference, limit,
                           jax.process_index(), jax.process_count())
    return merge_over_processes(shard).compute()

  return evaluate
