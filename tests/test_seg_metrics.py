"""Segmentation metrics against hand-computed fixtures (visgen_jax.eval.segmentation)."""

from collections import defaultdict
from fractions import Fraction as F

import numpy as np
import pytest

from visgen_jax.errors import UserError
from visgen_jax.eval.segmentation import InstanceMetric, PanopticMetric, SemanticMetric

# --- semantic ---------------------------------------------------------------------------------

SEM_LABEL = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, 255, 255],
                      [2, 2, 2, 255]])
SEM_PRED = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 2],
                     [2, 0, 0, 1],
                     [2, 2, 2, 2]])
# 13 labelled pixels. Confusion [label][prediction]: class 0 → 3×0, 1×1; class 1 → 3×1, 1×2;
# class 2 → 4×2, 1×0. Predicted counts on labelled pixels: 0: 4, 1: 4, 2: 5.
# IoU0 = 3/(4+4−3) = 3/5, IoU1 = 3/(4+4−3) = 3/5, IoU2 = 4/(5+5−4) = 2/3; no class 3 at all.
IOU = [F(3, 5), F(3, 5), F(2, 3)]
MIOU = sum(IOU) / 3                                      # 28/45
PIXEL_ACC = F(3 + 3 + 4, 13)                             # 10/13
MEAN_ACC = (F(3, 4) + F(3, 4) + F(4, 5)) / 3             # 23/30
FWIOU = F(4, 13) * IOU[0] + F(4, 13) * IOU[1] + F(5, 13) * IOU[2]  # 122/195


def test_semantic_metric_by_hand():
  metric = SemanticMetric(num_classes=4, ignore_label=255)
  metric.update(SEM_PRED, SEM_LABEL)
  result = metric.compute()
  assert MIOU == F(28, 45) and FWIOU == F(122, 195)
  assert result['miou'] == pytest.approx(float(MIOU))
  assert result['fwiou'] == pytest.approx(float(FWIOU))
  assert result['pixel_acc'] == pytest.approx(float(PIXEL_ACC))
  assert result['mean_acc'] == pytest.approx(float(MEAN_ACC))
  iou = metric.per_class_iou()
  np.testing.assert_allclose(iou[:3], [float(x) for x in IOU])
  assert np.isnan(iou[3])


def test_semantic_metric_streams_and_merges():
  whole = SemanticMetric(4)
  whole.update(SEM_PRED, SEM_LABEL)
  streamed = SemanticMetric(4)
  streamed.update(SEM_PRED[:2], SEM_LABEL[:2])
  streamed.update(SEM_PRED[2:], SEM_LABEL[2:])
  other = SemanticMetric(4)
  other.update(SEM_PRED[:, :1], SEM_LABEL[:, :1])
  merged = SemanticMetric(4)
  merged.update(SEM_PRED[:, 1:], SEM_LABEL[:, 1:])
  merged.merge(other)
  np.testing.assert_array_equal(streamed.confusion, whole.confusion)
  np.testing.assert_array_equal(merged.confusion, whole.confusion)


def test_semantic_metric_rejects_bad_input():
  metric = SemanticMetric(4)
  with pytest.raises(UserError, match='resize'):
    metric.update(SEM_PRED[:3], SEM_LABEL)
  with pytest.raises(UserError, match='ignore_label'):
    metric.update(SEM_PRED, np.full((4, 4), 7))
  with pytest.raises(UserError, match='prediction'):
    metric.update(np.full((4, 4), 4), SEM_LABEL)
  with pytest.raises(UserError, match='integer'):
    metric.update(SEM_PRED.astype(float), SEM_LABEL)
  with pytest.raises(UserError, match='no labelled pixel'):
    metric.compute()


# --- panoptic ---------------------------------------------------------------------------------

CATEGORIES = [{'id': 1, 'isthing': 1}, {'id': 2, 'isthing': 1},   # person, car
              {'id': 3, 'isthing': 0}, {'id': 4, 'isthing': 0}]   # sky, grass
GT1 = np.array([[1, 1, 1, 3, 3, 3],
                [1, 1, 1, 3, 3, 3],
                [1, 1, 1, 3, 3, 0],
                [2, 2, 2, 4, 4, 0],
                [2, 2, 2, 4, 4, 0],
                [5, 5, 5, 5, 5, 0]])
GT1_SEGMENTS = [{'id': 1, 'category_id': 1}, {'id': 2, 'category_id': 2},
                {'id': 3, 'category_id': 3}, {'id': 4, 'category_id': 4},
                {'id': 5, 'category_id': 1, 'iscrowd': 1}]
PRED1 = np.array([[1, 1, 1, 3, 3, 3],
                  [1, 1, 1, 3, 3, 3],
                  [1, 1, 0, 3, 3, 3],
                  [2, 2, 6, 6, 6, 7],
                  [0, 0, 6, 6, 6, 7],
                  [8, 8, 8, 8, 8, 7]])
PRED1_SEGMENTS = [{'id': 1, 'category_id': 1}, {'id': 2, 'category_id': 2},
                  {'id': 3, 'category_id': 3}, {'id': 6, 'category_id': 4},
                  {'id': 7, 'category_id': 2}, {'id': 8, 'category_id': 1}]
# Image 1:
#   person: gt 1 (9 px) vs pred 1 (8 px): 8 / (9 + 8 − 8) = 8/9 > 0.5 → TP.
#   sky:    gt 3 (8 px) vs pred 3 (9 px, 1 on VOID): 8 / (8 + 9 − 8 − 1) = 1 → TP.
#   car:    gt 2 (6 px) vs pred 2 (2 px): 2/6 → no match: FN and FP. Pred 7 (car) lies
#           entirely on VOID → not an FP.
#   grass:  gt 4 (4 px) vs pred 6 (6 px): 4/6 = 2/3 → TP.
#   Pred 8 (person) lies on the person crowd region 5 → not an FP; the crowd is no FN.
# Per class (PQ, SQ, RQ): person (8/9, 8/9, 1), car (0, 0, 0), sky (1, 1, 1), grass (2/3, 2/3, 1).
IMAGE1 = {
    'pq': (F(8, 9) + 0 + 1 + F(2, 3)) / 4, 'sq': (F(8, 9) + 0 + 1 + F(2, 3)) / 4, 'rq': F(3, 4),
    'pq_th': F(4, 9), 'sq_th': F(4, 9), 'rq_th': F(1, 2),
    'pq_st': F(5, 6), 'sq_st': F(5, 6), 'rq_st': F(1),
}
# Image 2: all sky in the ground truth; the prediction's sky covers 30 of 36 pixels
# (IoU 30/36 = 5/6, TP) and its grass row is an FP.
GT2 = np.ones((6, 6), int)
GT2_SEGMENTS = [{'id': 1, 'category_id': 3}]
PRED2 = np.ones((6, 6), int)
PRED2[5] = 2
PRED2_SEGMENTS = [{'id': 1, 'category_id': 3}, {'id': 2, 'category_id': 4}]
# Both images: sky iou 1 + 5/6 = 11/6 over 2 TP → (11/12, 11/12, 1);
# grass iou 2/3, 1 TP, 1 FP → PQ (2/3)/(1 + 1/2) = 4/9, SQ 2/3, RQ 2/3.
BOTH = {
    'pq': (F(8, 9) + 0 + F(11, 12) + F(4, 9)) / 4,   # 9/16
    'sq': (F(8, 9) + 0 + F(11, 12) + F(2, 3)) / 4,   # 89/144
    'rq': (1 + 0 + 1 + F(2, 3)) / 4,                 # 2/3
    'pq_th': F(4, 9), 'sq_th': F(4, 9), 'rq_th': F(1, 2),
    'pq_st': (F(11, 12) + F(4, 9)) / 2,              # 49/72
    'sq_st': (F(11, 12) + F(2, 3)) / 2,              # 19/24
    'rq_st': (1 + F(2, 3)) / 2,                      # 5/6
}


def assert_pq(result, expected):
  for name, value in expected.items():
    assert result[name] == pytest.approx(float(value)), name


def test_panoptic_metric_by_hand():
  assert BOTH['pq'] == F(9, 16) and BOTH['sq'] == F(89, 144) and BOTH['pq_st'] == F(49, 72)
  metric = PanopticMetric(CATEGORIES)
  metric.update(PRED1, PRED1_SEGMENTS, GT1, GT1_SEGMENTS)
  result = metric.compute()
  assert_pq(result, IMAGE1)
  assert (result['n'], result['n_th'], result['n_st']) == (4, 2, 2)
  metric.update(PRED2, PRED2_SEGMENTS, GT2, GT2_SEGMENTS)
  assert_pq(metric.compute(), BOTH)
  # The same two images on two workers, merged.
  first, second = PanopticMetric(CATEGORIES), PanopticMetric(CATEGORIES)
  first.update(PRED1, PRED1_SEGMENTS, GT1, GT1_SEGMENTS)
  second.update(PRED2, PRED2_SEGMENTS, GT2, GT2_SEGMENTS)
  first.merge(second)
  assert_pq(first.compute(), BOTH)


def reference_pq(images, categories):
  """Pixel-mask loops over segment pairs: the panopticapi rules written out naively."""
  stats = defaultdict(lambda: [0.0, 0, 0, 0])
  for pred_map, pred_segments, gt_map, gt_segments in images:
    void = gt_map == 0
    gt_matched, pred_matched = set(), set()
    for g in gt_segments:
      if g.get('iscrowd'):
        continue
      gt_mask = gt_map == g['id']
      for p in pred_segments:
        pred_mask = pred_map == p['id']
        if p['category_id'] != g['category_id'] or not pred_mask.any():
          continue
        union = (gt_mask | pred_mask).sum() - (pred_mask & void).sum()
        iou = (gt_mask & pred_mask).sum() / union
        if iou > 0.5:
          stats[g['category_id']][0] += iou
          stats[g['category_id']][1] += 1
          gt_matched.add(g['id'])
          pred_matched.add(p['id'])
    for g in gt_segments:
      if not g.get('iscrowd') and g['id'] not in gt_matched:
        stats[g['category_id']][3] += 1
    for p in pred_segments:
      pred_mask = pred_map == p['id']
      if p['id'] in pred_matched or not pred_mask.any():
        continue
      crowd = np.isin(gt_map, [g['id'] for g in gt_segments
                               if g.get('iscrowd') and g['category_id'] == p['category_id']])
      if ((void | crowd) & pred_mask).sum() / pred_mask.sum() <= 0.5:
        stats[p['category_id']][2] += 1
  pq = {}
  for c in categories:
    iou, tp, fp, fn = stats[c['id']]
    if tp + fp + fn:
      pq[c['id']] = (iou / (tp + fp / 2 + fn / 2), tp / (tp + fp / 2 + fn / 2))
  return (np.mean([v[0] for v in pq.values()]), np.mean([v[1] for v in pq.values()]))


def random_panoptic_image(rng):
  """Blocky 6×6 ground truth with VOID and at most one crowd per category; a noisy prediction."""
  gt = np.kron(rng.integers(0, 5, (3, 3)), np.ones((2, 2), int))
  gt_segments = []
  crowd_categories = set()
  for segment_id in np.unique(gt[gt > 0]):
    category = int(rng.integers(1, 5))
    crowd = category not in crowd_categories and rng.random() < 0.2
    if crowd:
      crowd_categories.add(category)
    gt_segments.append({'id': int(segment_id), 'category_id': category, 'iscrowd': int(crowd)})
  pred = gt.copy()
  noise = rng.random(gt.shape) < 0.3
  pred[noise] = rng.integers(0, 7, noise.sum())
  pred_segments = []
  for segment_id in np.unique(pred[pred > 0]):
    same = [g['category_id'] for g in gt_segments if g['id'] == segment_id]
    category = same[0] if same and rng.random() < 0.8 else int(rng.integers(1, 5))
    pred_segments.append({'id': int(segment_id), 'category_id': category})
  return pred, pred_segments, gt, gt_segments


def test_panoptic_metric_matches_naive_reference_on_random_maps():
  rng = np.random.default_rng(0)
  for _ in range(20):
    images = [random_panoptic_image(rng) for _ in range(3)]
    metric = PanopticMetric(CATEGORIES)
    for image in images:
      metric.update(*image)
    result = metric.compute()
    pq, rq = reference_pq(images, CATEGORIES)
    assert result['pq'] == pytest.approx(pq) and result['rq'] == pytest.approx(rq)


def test_panoptic_metric_rejects_bad_input():
  metric = PanopticMetric(CATEGORIES)
  with pytest.raises(UserError, match='no segment entry'):
    metric.update(PRED1, PRED1_SEGMENTS[:-1], GT1, GT1_SEGMENTS)
  with pytest.raises(UserError, match='not among the categories'):
    metric.update(PRED2, [{'id': 1, 'category_id': 9}], GT2, GT2_SEGMENTS)
  with pytest.raises(UserError, match='resize'):
    metric.update(PRED2[:5], PRED2_SEGMENTS, GT2, GT2_SEGMENTS)
  with pytest.raises(UserError, match='no image'):
    metric.compute()
  with pytest.raises(UserError, match='at least one category'):
    PanopticMetric([])


# --- instance (pycocotools) -------------------------------------------------------------------

def square(top, left, size, shape=(16, 16)):
  mask = np.zeros(shape, bool)
  mask[top:top + size, left:left + size] = True
  return mask


def test_mask_ap_perfect_prediction_is_one():
  pytest.importorskip('pycocotools')
  metric = InstanceMetric(num_classes=3)
  for shift in (0, 5):
    gt = np.stack([square(shift, 0, 4), square(8, shift + 2, 5), square(1, 10, 3)])
    labels = np.array([0, 2, 2])
    metric.update(gt, [0.9, 0.8, 0.7], labels, gt, labels)
  result = metric.compute()
  assert result['ap'] == pytest.approx(1.0)
  assert result['ap50'] == pytest.approx(1.0) and result['ap75'] == pytest.approx(1.0)
  assert result['ap_small'] == pytest.approx(1.0)
  assert result['ap_medium'] == -1 and result['ap_large'] == -1  # no such ground truth


def test_mask_ap_of_known_wrong_predictions():
  pytest.importorskip('pycocotools')
  # Two objects of class 0; the highest-scored prediction hits nothing. Ranked: FP, TP, TP →
  # precision 0, 1/2, 2/3 at recall 0, 1/2, 1; interpolated precision is 2/3 at every one of
  # the 101 recall points, at every IoU threshold.
  gt = np.stack([square(0, 0, 4), square(8, 8, 4)])
  pred = np.stack([square(0, 10, 4), square(0, 0, 4), square(8, 8, 4)])
  metric = InstanceMetric(num_classes=1)
  metric.update(pred, [0.9, 0.8, 0.7], [0, 0, 0], gt, [0, 0])
  assert metric.compute()['ap'] == pytest.approx(2 / 3)

  # One object (4×4 = 16 px); the prediction is a 3×3 square inside it: IoU 9/16 = 0.5625,
  # a TP at thresholds 0.50 and 0.55 only (2 of 10) → AP 2/10, AP50 1, AP75 0. A confident
  # prediction of class 1, which has no ground truth anywhere, does not count (COCO skips
  # classes without ground truth).
  metric = InstanceMetric(num_classes=2)
  metric.update(np.stack([square(0, 0, 3), square(8, 8, 4)]), [0.5, 0.99], [0, 1],
                square(0, 0, 4)[None], [0])
  result = metric.compute()
  assert result['ap'] == pytest.approx(0.2)
  assert result['ap50'] == pytest.approx(1.0) and result['ap75'] == pytest.approx(0.0)


def test_mask_ap_without_predictions_and_crowd():
  pytest.importorskip('pycocotools')
  metric = InstanceMetric(num_classes=1)
  metric.update(np.zeros((0, 16, 16), bool), [], [], square(0, 0, 4)[None], [0])
  assert metric.compute()['ap'] == 0
  # A prediction on a crowd region is neither TP nor FP: AP is that of the other object.
  other = InstanceMetric(num_classes=1)
  gt = np.stack([square(0, 0, 4), square(8, 8, 6)])
  other.update(gt, [0.9, 0.8], [0, 0], gt, [0, 0], gt_iscrowd=[False, True])
  merged = InstanceMetric(num_classes=1)
  merged.merge(other)
  assert merged.compute()['ap'] == pytest.approx(1.0)


def test_instance_metric_rejects_bad_input():
  metric = InstanceMetric(num_classes=2)
  gt = square(0, 0, 4)[None]
  with pytest.raises(UserError, match='one label each'):
    metric.update(gt, [0.5], [0, 1], gt, [0])
  with pytest.raises(UserError, match='labels must lie'):
    metric.update(gt, [0.5], [2], gt, [0])
  with pytest.raises(UserError, match='finite'):
    metric.update(gt, [float('nan')], [0], gt, [0])
  with pytest.raises(UserError, match='ground truth is'):
    metric.update(square(0, 0, 4, (8, 8))[None], [0.5], [0], gt, [0])
  with pytest.raises(UserError, match='no image'):
    metric.compute()


# --- merging shards, as processes do ----------------------------------------------------------

def random_instance_image(rng):
  """Two ground-truth squares; three predictions whose scores repeat across images (ties)."""
  gt = np.stack([square(*rng.integers(0, 10, 2), 5), square(*rng.integers(0, 10, 2), 4)])
  pred = np.stack([square(*rng.integers(0, 10, 2), int(rng.integers(3, 6))) for _ in range(3)])
  return pred, rng.choice([0.5, 0.9], 3), rng.integers(0, 2, 3), gt, rng.integers(0, 2, 2)


@pytest.mark.parametrize('metric_class, make_image, categories', [
    (PanopticMetric, random_panoptic_image, CATEGORIES),
    (InstanceMetric, random_instance_image, 2),
])
def test_shards_merged_equal_one_pass_exactly(metric_class, make_image, categories):
  """Images dealt to two processes in turn (p::2), merged: the one-pass results, to the bit
  (float sums in another order or ties broken in another image order would differ)."""
  if metric_class is InstanceMetric:
    pytest.importorskip('pycocotools')
  rng = np.random.default_rng(3)
  images = [make_image(rng) for _ in range(40)]
  whole = metric_class(categories)
  shards = [metric_class(categories), metric_class(categories)]
  for i, image in enumerate(images):
    whole.update(*image, image_id=i)
    shards[i % 2].update(*image, image_id=i)
  shards[0].merge(shards[1])
  assert shards[0].compute() == whole.compute()


def test_instance_metrics_with_the_same_image_ids_do_not_merge():
  gt = square(0, 0, 4)[None]
  first, second = InstanceMetric(1), InstanceMetric(1)
  first.update(gt, [0.5], [0], gt, [0])
  second.update(gt, [0.5], [0], gt, [0])
  with pytest.raises(ValueError, match='image ids'):
    first.merge(second)
