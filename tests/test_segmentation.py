"""Matching, set loss and post-processing of visgen_jax.segmentation."""

import itertools
import json
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from visgen_jax.errors import UserError
from visgen_jax.segmentation import losses, matching, postprocess


def bilinear_reference(image, x, y):
  """One sample of image [H, W] at normalised (x, y), align_corners=False, zero padding."""
  height, width = image.shape
  px, py = x * width - 0.5, y * height - 0.5
  x0, y0 = math.floor(px), math.floor(py)
  total = 0.0
  for yi in (y0, y0 + 1):
    for xi in (x0, x0 + 1):
      if 0 <= xi < width and 0 <= yi < height:
        total += image[yi, xi] * (1 - abs(px - xi)) * (1 - abs(py - yi))
  return total


# --- point sampling ---------------------------------------------------------------------------

def test_point_sample_matches_loop_reference_with_rows():
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(3, 5, 7)).astype(np.float32)
  coords = rng.uniform(size=(4, 9, 2)).astype(np.float32)
  coords[0, :4] = [[0.0, 0.0], [0.999, 0.999], [0.02, 0.97], [0.5, 0.5]]  # borders and a centre
  rows = np.array([2, 0, 0, 1])
  got = np.asarray(losses.point_sample(jnp.asarray(maps), jnp.asarray(coords), jnp.asarray(rows)))
  want = np.array([[bilinear_reference(maps[r], x, y) for x, y in coords[i]]
                   for i, r in enumerate(rows)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The pixel centre of (row 1, column 2) of map 2 is read exactly.
  centre = jnp.asarray([[[2.5 / 7, 1.5 / 5]]], jnp.float32)
  assert float(losses.point_sample(jnp.asarray(maps[2:]), centre)[0, 0]) == pytest.approx(
      maps[2, 1, 2], rel=1e-6)


def test_point_sample_matches_torch_grid_sample():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  maps = rng.normal(size=(2, 6, 4)).astype(np.float32)
  coords = rng.uniform(size=(2, 50, 2)).astype(np.float32)
  want = torch.nn.functional.grid_sample(
      torch.from_numpy(maps)[:, None], 2 * torch.from_numpy(coords)[:, :, None] - 1,
      align_corners=False)[:, 0, :, 0].numpy()
  got = np.asarray(losses.point_sample(jnp.asarray(maps), jnp.asarray(coords)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_uncertain_points_prefer_logits_near_zero():
  width = 32
  # Logit 10·(x − 0.5): uncertainty is highest on the vertical line x = 0.5.
  xs = (np.arange(width) + 0.5) / width
  maps = jnp.asarray(np.broadcast_to(10 * (xs - 0.5), (1, width, width)), jnp.float32)
  count = losses.num_uniform_points(100, 3.0, 0.75)
  assert count == 300 + 25
  uniform = jnp.asarray(np.random.default_rng(0).uniform(size=(2, count, 2)), jnp.float32)
  points = losses.uncertain_point_coords(uniform, maps, jnp.array([0, 0]), 100, 3.0, 0.75)
  assert points.shape == (2, 100, 2)
  important = np.asarray(points[:, :75, 0])
  # The 75 most uncertain of 300 uniform candidates lie within ~0.125 of the line ...
  assert np.abs(important - 0.5).max() < 0.2
  candidates = set(np.asarray(uniform[0, :300, 0]).tolist())
  assert set(np.asarray(points[0, :75, 0]).tolist()) <= candidates
  # ... and the last 25 are the uniform fill, as drawn.
  np.testing.assert_array_equal(points[:, 75:], uniform[:, 300:])
  with pytest.raises(UserError, match='oversample_ratio'):
    losses.num_uniform_points(10, 0.5, 0.75)


def test_bce_and_dice_per_row():
  logits = jnp.array([[0.0, 2.0, -1.0]])
  labels = jnp.array([[1.0, 0.0, 1.0]])
  sig = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0])))
  bce = -(np.log(sig[0]) + np.log(1 - sig[1]) + np.log(sig[2])) / 3
  dice = 1 - (2 * (sig[0] + sig[2]) + 1) / (sig.sum() + 2 + 1)
  assert float(losses.sigmoid_bce(logits, labels)[0]) == pytest.approx(bce, rel=1e-6)
  assert float(losses.dice(logits, labels)[0]) == pytest.approx(dice, rel=1e-6)


# --- matching ---------------------------------------------------------------------------------

def test_matching_cost_terms_by_hand():
  class_logits = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]]))  # C = 2 (+ no object)
  point_logits = jnp.array([[[0.0, 0.0], [3.0, -3.0]]])
  point_labels = jnp.array([[[1.0, 0.0]]])
  cost = np.asarray(matching.matching_cost(class_logits, point_logits, jnp.array([[1]]),
                                           point_labels, class_weight=2, mask_weight=5,
                                           dice_weight=5))
  log2 = math.log(2)
  sp3 = math.log1p(math.exp(-3))  # softplus(-3)
  s3 = 1 / (1 + math.exp(-3))
  want0 = 2 * -0.2 + 5 * log2 + 5 * (1 - (2 * 0.5 + 1) / (1.0 + 1 + 1))
  want1 = 2 * -0.3 + 5 * sp3 + 5 * (1 - (2 * s3 + 1) / (1.0 + 1 + 1))
  np.testing.assert_allclose(cost[0, :, 0], [want0, want1], rtol=1e-5)


def brute_force_cost(cost, valid):
  columns = np.flatnonzero(valid)
  num_preds = cost.shape[0]
  if columns.size == 0:
    return 0.0
  if columns.size <= num_preds:
    return min(sum(cost[p, c] for p, c in zip(perm, columns))
               for perm in itertools.permutations(range(num_preds), columns.size))
  return min(sum(cost[p, c] for p, c in enumerate(perm))
             for perm in itertools.permutations(columns, num_preds))


_jit_match = jax.jit(matching.hungarian_match)


@settings(max_examples=40, deadline=None)
@given(num_preds=st.integers(1, 4), num_targets=st.integers(1, 4), seed=st.integers(0, 2 ** 16),
       valid_bits=st.integers(0, 255))
def test_hungarian_equals_brute_force_under_jit(num_preds, num_targets, seed, valid_bits):
  rng = np.random.default_rng(seed)
  cost = rng.normal(size=(2, num_preds, num_targets)).astype(np.float32)
  valid = np.array([[(valid_bits >> (4 * b + k)) & 1 for k in range(num_targets)]
                    for b in range(2)], bool)
  pred_index, matched = map(np.asarray, _jit_match(jnp.asarray(cost), jnp.asarray(valid)))
  for b in range(2):
    assert not (matched[b] & ~valid[b]).any()
    assert matched[b].sum() == min(num_preds, valid[b].sum())
    chosen = pred_index[b][matched[b]]
    assert len(set(chosen.tolist())) == chosen.size
    total = cost[b][chosen, np.flatnonzero(matched[b])].sum()
    assert total == pytest.approx(brute_force_cost(cost[b], valid[b]), abs=1e-5)


def test_hungarian_tolerates_non_finite_costs():
  cost = jnp.array([[[jnp.nan, 1.0], [0.0, jnp.inf]]])
  pred_index, matched = _jit_match(cost, jnp.array([[True, True]]))
  assert np.asarray(matched).all()
  np.testing.assert_array_equal(np.asarray(pred_index), [[1, 0]])


# --- set criterion ----------------------------------------------------------------------------

NUM_CLASSES = 2


def criterion(outputs, targets, key=jax.random.key(0), **kw):
  kw.setdefault('num_points', 64)
  return losses.set_criterion(outputs, targets, key, num_classes=NUM_CLASSES, **kw)


# The tests below but one share B=2, M=3, K=2, 8×8 masks and this one compiled function
# (each compile takes seconds); the no-object weight is a traced argument.
_value_and_grad = jax.jit(jax.value_and_grad(
    lambda outputs, targets, key, weight: criterion(outputs, targets, key,
                                                    no_object_weight=weight), has_aux=True))


def loss_and_grad(outputs, targets, key=jax.random.key(0), no_object_weight=0.1):
  """((loss, metrics), gradients) of the default criterion, compiled once per shape."""
  return _value_and_grad(outputs, targets, key, no_object_weight)


def random_outputs(key):
  return [(jax.random.normal(key, (2, 3, NUM_CLASSES + 1)),
           jax.random.normal(jax.random.fold_in(key, 1), (2, 3, 8, 8)))]


def test_zero_targets_leave_only_no_object_cross_entropy():
  outputs = random_outputs(jax.random.key(1))
  targets = (jnp.zeros((2, 2, 8, 8), bool), jnp.full((2, 2), 7, jnp.int32),  # padding: any class
             jnp.zeros((2, 2), bool))
  (loss, metrics), grads = loss_and_grad(outputs, targets)
  # Every query's target is "no object"; equal weights make the weighted mean a plain mean.
  want = 2.0 * -jax.nn.log_softmax(outputs[0][0])[..., -1].mean()
  assert float(loss) == pytest.approx(float(want), rel=1e-5)
  assert float(metrics['loss_mask']) == 0 and float(metrics['loss_dice']) == 0
  assert float(metrics['num_masks']) == 1
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads[0][1]).max()) == 0  # masks get no gradient without targets
  # A zero no-object weight leaves nothing to average: 0, not 0/0.
  (loss, _), grads = loss_and_grad(outputs, targets, no_object_weight=0.0)
  assert float(loss) == 0
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('no_object_weight', [0.1, 0.0, 1.0])
def test_class_term_down_weights_no_object(no_object_weight):
  # Image 0: one target (class 1, left half) and a padding row; image 1: no target.
  target = np.zeros((2, 2, 8, 8), bool)
  target[0, 0, :, :4] = True
  targets = (jnp.asarray(target), jnp.array([[1, 0], [0, 0]]),
             jnp.array([[True, False], [False, False]]))
  # Prediction 0 of image 0 has exactly the target's mask, the others its complement.
  left = np.where(target[0, 0], 10.0, -10.0)
  mask_logits = jnp.asarray(np.stack([np.stack([left, -left, -left])] * 2), jnp.float32)
  class_logits = jax.random.normal(jax.random.key(3), (2, 3, NUM_CLASSES + 1))
  (_, metrics), _ = loss_and_grad([(class_logits, mask_logits)], targets,
                                        no_object_weight=no_object_weight)
  nll = -np.asarray(jax.nn.log_softmax(class_logits), np.float64)
  # Weighted mean: the matched query weighs 1, each of the 5 unmatched ones no_object_weight.
  unmatched = nll[0, 1, 2] + nll[0, 2, 2] + nll[1, :, 2].sum()
  want = (nll[0, 0, 1] + no_object_weight * unmatched) / (1 + 5 * no_object_weight)
  assert float(metrics['loss_ce']) == pytest.approx(2.0 * want, rel=1e-5)


def test_gradient_steps_move_predictions_to_the_targets():
  optax = pytest.importorskip('optax')
  # Image 0: left half is class 0, right half class 1; image 1 has no target.
  target = np.zeros((2, 2, 8, 8), bool)
  target[0, 0, :, :4] = True
  target[0, 1, :, 4:] = True
  targets = (jnp.asarray(target), jnp.array([[0, 1], [0, 0]]),
             jnp.array([[True, True], [False, False]]))
  key = jax.random.key(2)
  params = jax.tree.map(lambda x: 0.1 * x, random_outputs(key))
  optimizer = optax.adam(0.1)
  state = optimizer.init(params)
  first = None
  for i in range(60):
    (loss, _), grads = loss_and_grad(params, targets, jax.random.fold_in(key, i))
    updates, state = optimizer.update(grads, state)
    params = optax.apply_updates(params, updates)
    first = float(loss) if first is None else first
  final = float(loss_and_grad(params, targets, jax.random.key(99))[0][0])
  # Not to 0: points within half a pixel of the border read zero padding, as in the public code.
  assert final < 0.5 * first, (first, final)
  masks = np.asarray(params[0][1] > 0)
  labels = np.asarray(params[0][0]).argmax(-1)
  # Each target now has a prediction with its exact binary mask and its class ...
  for k, cls in enumerate((0, 1)):
    assert any((masks[0, m] == target[0, k]).all() and labels[0, m] == cls for m in range(3))
  # ... and the queries of the empty image say "no object".
  np.testing.assert_array_equal(labels[1], [NUM_CLASSES] * 3)


def test_normalised_by_all_target_masks_and_summed_over_layers():
  # Zero mask logits read 0 everywhere and empty targets read 0 everywhere, so every point
  # gives BCE log 2 and dice 1 − 1/(P/2 + 1) whatever points are drawn.
  num_points = 64
  class_logits = jnp.zeros((1, 1, NUM_CLASSES + 1))
  mask_logits = jnp.zeros((1, 1, 4, 4))
  targets = (jnp.zeros((1, 3, 4, 4)), jnp.array([[0, 1, 0]]), jnp.array([[True, True, False]]))
  outputs = [(class_logits, mask_logits), (class_logits, mask_logits)]
  two_layers = jax.jit(criterion, static_argnames='aux_class_loss')
  loss, metrics = two_layers(outputs, targets)
  # One prediction, two valid targets: one pair, divided by num_masks = 2.
  assert float(metrics['num_masks']) == 2
  bce = 5 * math.log(2) / 2
  dice = 5 * (1 - 1 / (num_points / 2 + 1)) / 2
  ce = 2 * math.log(3)  # uniform logits; the single query is matched
  for suffix in ('', '_0'):
    assert float(metrics['loss_mask' + suffix]) == pytest.approx(bce, rel=1e-5)
    assert float(metrics['loss_dice' + suffix]) == pytest.approx(dice, rel=1e-5)
  assert 'loss_ce_0' not in metrics
  assert float(loss) == pytest.approx(ce + 2 * (bce + dice), rel=1e-5)
  loss_aux_ce, metrics = two_layers(outputs, targets, aux_class_loss=True)
  assert float(metrics['loss_ce_0']) == pytest.approx(ce, rel=1e-5)
  assert float(loss_aux_ce) == pytest.approx(2 * ce + 2 * (bce + dice), rel=1e-5)


def test_criterion_rejects_wrong_class_count():
  outputs = [(jnp.zeros((1, 2, 5)), jnp.zeros((1, 2, 4, 4)))]
  targets = (jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))
  with pytest.raises(UserError, match='num_classes'):
    criterion(outputs, targets)
  with pytest.raises(UserError, match='at least one'):
    criterion([], targets)


# --- post-processing --------------------------------------------------------------------------

def test_semantic_inference_by_hand():
  class_logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]))
  mask_logits = np.zeros((2, 2, 2))
  mask_logits[1] = 100.0  # σ = 1
  scores = postprocess.semantic_inference(class_logits, mask_logits)
  # class 0: 0.5·σ(0) + 0.1·1 = 0.35; class 1: 0.25·0.5 + 0.6·1 = 0.725
  np.testing.assert_allclose(scores[:, 0, 0], [0.35, 0.725], rtol=1e-6)
  empty = postprocess.semantic_inference(np.zeros((0, 3)), np.zeros((0, 2, 2)))
  np.testing.assert_array_equal(empty, np.zeros((2, 2, 2)))


def test_instance_inference_top_k_scores_and_things():
  class_logits = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]))
  mask_logits = np.full((2, 2, 2), -5.0)
  mask_logits[0, 0, :] = [0.0 + 1e-3, math.log(3)]  # σ ≈ 0.5 and 0.75 inside the mask
  mask_logits[1] = 20.0
  masks, scores, labels = postprocess.instance_inference(class_logits, mask_logits, topk=3)
  # Pairs by class probability: (q1, c1) 0.7, (q0, c0) 0.6, (q0, c1) 0.3.
  np.testing.assert_array_equal(labels, [1, 0, 1])
  np.testing.assert_array_equal(masks[1], [[True, True], [False, False]])
  np.testing.assert_allclose(scores, [0.7 * 1.0, 0.6 * 0.625, 0.3 * 0.625], rtol=1e-3)
  _, _, labels = postprocess.instance_inference(class_logits, mask_logits, topk=100,
                                                is_thing=[True, False])
  np.testing.assert_array_equal(labels, [0, 0])  # 4 pairs in all, class 1 is stuff
  masks, scores, labels = postprocess.instance_inference(np.zeros((0, 3)), np.zeros((0, 4, 4)))
  assert masks.shape == (0, 4, 4) and scores.shape == (0,) and labels.shape == (0,)


def panoptic_case():
  """4×4 image, classes 0 (thing) and 1 (stuff), no object = 2."""
  big = 20.0
  masks = np.full((5, 4, 4), -big)
  masks[0, :, :2] = big            # thing, left half
  masks[1, :2, 2:] = big           # stuff, top right
  masks[2, 2:, 2:] = big           # stuff, bottom right: merged with query 1
  masks[3, :, :] = big             # best class is "no object": dropped
  masks[4, :, :2] = big            # thing under query 0 with a lower score: owns nothing
  probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.05, 0.85, 0.1], [0.1, 0.1, 0.8],
                    [0.7, 0.2, 0.1]])
  return np.log(probs), masks


def test_panoptic_inference_merges_stuff_and_applies_thresholds():
  class_logits, mask_logits = panoptic_case()
  panoptic, segments = postprocess.panoptic_inference(class_logits, mask_logits, [True, False])
  np.testing.assert_array_equal(panoptic, [[1, 1, 2, 2]] * 4)
  assert segments == [
      {'id': 1, 'category_id': 0, 'isthing': True, 'score': pytest.approx(0.9), 'area': 8},
      {'id': 2, 'category_id': 1, 'isthing': False, 'score': pytest.approx(0.85), 'area': 8}]
  # With query 0 gone, query 4 keeps all of its mask and becomes the thing.
  panoptic, segments = postprocess.panoptic_inference(class_logits[1:], mask_logits[1:],
                                                      [True, False])
  assert [s['score'] for s in segments] == [pytest.approx(0.85), pytest.approx(0.7)]
  # Query 0 moves to columns 1-2 and takes column 1 from query 4 and column 2 from the stuff
  # queries: query 4 keeps 4 of its 8 pixels, queries 1 and 2 keep 2 of their 4. All survive
  # overlap_threshold 0.5 (stuff merged: 3 segments); at 0.6 only query 0 is left.
  mask_logits[0, :, :] = -20.0
  mask_logits[0, :, 1:3] = 20.0
  for threshold, kept in ((0.5, 3), (0.6, 1)):
    _, segments = postprocess.panoptic_inference(class_logits, mask_logits, [True, False],
                                                 overlap_threshold=threshold)
    assert len(segments) == kept


def test_panoptic_inference_empty_results():
  class_logits, mask_logits = panoptic_case()
  panoptic, segments = postprocess.panoptic_inference(np.zeros((0, 3)), np.zeros((0, 4, 4)),
                                                      [True, False])
  assert segments == [] and panoptic.shape == (4, 4) and not panoptic.any()
  panoptic, segments = postprocess.panoptic_inference(class_logits, mask_logits, [True, False],
                                                      object_mask_threshold=0.95)
  assert segments == [] and not panoptic.any()
  panoptic, segments = postprocess.panoptic_inference(class_logits, np.full((5, 4, 4), -20.0),
                                                      [True, False])
  assert segments == [] and not panoptic.any()


def test_postprocess_rejects_bad_input():
  with pytest.raises(UserError, match='class list is empty'):
    postprocess.semantic_inference(np.zeros((2, 1)), np.zeros((2, 4, 4)))
  with pytest.raises(UserError, match='one to one'):
    postprocess.instance_inference(np.zeros((3, 3)), np.zeros((2, 4, 4)))
  with pytest.raises(UserError, match='is_thing'):
    postprocess.panoptic_inference(np.zeros((2, 3)), np.zeros((2, 4, 4)), [True])


def test_coco_panoptic_png_and_json_round_trip(tmp_path):
  panoptic = np.zeros((3, 5), np.int32)
  panoptic[0, 1:4] = 70000  # needs all three channels
  panoptic[1:, 4] = 2
  segments = [{'id': 70000, 'category_id': 1}, {'id': 2, 'category_id': 0}, {'id': 9,
                                                                             'category_id': 0}]
  path = tmp_path / 'out' / 'img.png'
  entry = postprocess.write_coco_panoptic(str(path), panoptic, segments, image_id=7,
                                          category_ids=[5, 12])
  np.testing.assert_array_equal(postprocess.read_coco_panoptic(str(path)), panoptic)
  assert list(postprocess.id_to_rgb(np.array([70000]))[0]) == [70000 % 256, 70000 // 256 % 256, 1]
  assert entry == {'image_id': 7, 'file_name': 'img.png', 'segments_info': [
      {'id': 70000, 'category_id': 12, 'iscrowd': 0, 'area': 3, 'bbox': [1, 0, 3, 1]},
      {'id': 2, 'category_id': 5, 'iscrowd': 0, 'area': 2, 'bbox': [4, 1, 1, 2]}]}
  json_path = tmp_path / 'panoptic.json'
  postprocess.write_coco_panoptic_json(str(json_path), [entry], [{'id': 5}, {'id': 12}])
  assert json.loads(json_path.read_text())['annotations'] == [entry]
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['img.png']
