"""Mask classification loss of MaskCLIP (Mask2Former's set criterion) in JAX.

Masks are compared on sampled points, never at full resolution: the matcher uses P points
drawn uniformly (shared by all masks of an image); the loss draws `oversample_ratio`·P
uniform candidates per matched pair, keeps the `importance_sample_ratio`·P most uncertain
ones (|logit| smallest) and adds the rest uniformly (PointRend's scheme). Coordinates are
(x, y) in [0, 1]², read by bilinear interpolation with align_corners=False and zero
padding, as torch's grid_sample(2·c − 1) does.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from visgen_jax.errors import UserError
from visgen_jax.segmentation import matching

# Public defaults: maskclip/config.py (MODEL.MASK_FORMER.*), 112·112 points, k = 3, β = 0.75.
NO_OBJECT_WEIGHT = 0.1
NUM_POINTS = 112 * 112
OVERSAMPLE_RATIO = 3.0
IMPORTANCE_SAMPLE_RATIO = 0.75


def point_sample(maps, coords, rows=None):
  """Bilinear samples of maps [N, H, W] at coords [R, P, 2] ((x, y) in [0, 1]) → [R, P].

  Row r reads map rows[r] (default: map r, with R = N). Pixel centres sit at
  ((i + 0.5) / W, (j + 0.5) / H); neighbours outside the map count as 0.
  """
  num_maps, height, width = maps.shape
  if rows is None:
    rows = jnp.arange(num_maps)
  flat = maps.reshape(num_maps, height * width)
  x = coords[..., 0] * width - 0.5
  y = coords[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  # The four neighbours on a trailing axis: one gather instead of four (faster to compile).
  xi = x0[..., None] + jnp.array([0.0, 1.0, 0.0, 1.0])
  yi = y0[..., None] + jnp.array([0.0, 0.0, 1.0, 1.0])
  weight = (1.0 - jnp.abs(x[..., None] - xi)) * (1.0 - jnp.abs(y[..., None] - yi))
  inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
  index = (jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)).astype(jnp.int32)
  values = flat[rows[:, None, None], index]
  return (jnp.where(inside, values, 0.0) * weight).sum(-1)


def _check_sampling(oversample_ratio, importance_sample_ratio):
  if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
    raise UserError(f'oversample_ratio={oversample_ratio} must be >= 1 and '
                    f'importance_sample_ratio={importance_sample_ratio} in [0, 1].')


def num_uniform_points(num_points: int, oversample_ratio: float,
                       importance_sample_ratio: float) -> int:
  """How many uniform points `uncertain_point_coords` consumes per row."""
  _check_sampling(oversample_ratio, importance_sample_ratio)
  return int(num_points * oversample_ratio) + num_points - int(importance_sample_ratio * num_points)


def uncertain_point_coords(uniform, maps, rows, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float):
  """PointRend's training points [R, num_points, 2] for map rows[r] of maps [N, H, W].

  uniform [R, num_uniform_points(...), 2] are U[0, 1) numbers drawn by the caller (so that
  one random draw serves the matcher and the loss of a layer). The first
  int(num_points·oversample_ratio) are candidates, of which the int(importance_sample_ratio·
  num_points) with the smallest |logit| are kept; the rest of `uniform` fills up.
  """
  _check_sampling(oversample_ratio, importance_sample_ratio)
  num_sampled = int(num_points * oversample_ratio)
  num_uncertain = int(importance_sample_ratio * num_points)
  candidates, extra = uniform[:, :num_sampled], uniform[:, num_sampled:]
  uncertainty = -jnp.abs(point_sample(jax.lax.stop_gradient(maps), candidates, rows))
  _, top = jax.lax.top_k(uncertainty, num_uncertain)
  picked = jnp.take_along_axis(candidates, top[..., None], axis=1)
  return jnp.concatenate([picked, extra], axis=1)


def sigmoid_bce(logits, labels):
  """Per-row mean over points of the sigmoid cross-entropy, logits/labels [R, P] → [R]."""
  per_point = jax.nn.softplus(logits) - logits * labels
  return per_point.mean(-1)


def dice(logits, labels):
  """Per-row 1 − soft dice with +1 smoothing, logits/labels [R, P] → [R]."""
  p = jax.nn.sigmoid(logits)
  return 1.0 - (2.0 * (p * labels).sum(-1) + 1.0) / (p.sum(-1) + labels.sum(-1) + 1.0)


def _weighted_class_ce(class_logits, pred_classes, no_object_weight):
  """Cross-entropy averaged with class weights (no-object down-weighted), as torch's CE."""
  num_classes = class_logits.shape[-1] - 1
  log_probs = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, pred_classes[..., None], axis=-1)[..., 0]
  weight = jnp.where(pred_classes == num_classes, no_object_weight, 1.0)
  total = weight.sum()
  # All queries unmatched with a zero no-object weight: torch gives 0/0; nothing to learn.
  return jnp.where(total > 0, (weight * nll).sum() / jnp.where(total > 0, total, 1.0), 0.0)


def _layer_losses(class_logits, mask_logits, targets, num_masks, match_coords, pair_uniform, *,
                  class_weight, mask_weight, dice_weight, no_object_weight, num_points,
                  oversample_ratio, importance_sample_ratio):
  target_masks, target_classes, target_valid = targets
  batch, num_preds, height, width = mask_logits.shape
  num_targets = target_classes.shape[1]
  num_classes = class_logits.shape[-1] - 1
  mask_logits = mask_logits.astype(jnp.float32)
  target_masks = target_masks.astype(jnp.float32)
  flat_preds = mask_logits.reshape(batch * num_preds, height, width)
  flat_targets = target_masks.reshape((batch * num_targets,) + target_masks.shape[2:])

  # Matching on points shared by every mask of an image, without gradient.
  pred_points = point_sample(
      jax.lax.stop_gradient(flat_preds),
      jnp.repeat(match_coords, num_preds, axis=0)).reshape(batch, num_preds, num_points)
  target_points = point_sample(
      flat_targets,
      jnp.repeat(match_coords, num_targets, axis=0)).reshape(batch, num_targets, num_points)
  cost = matching.matching_cost(jax.lax.stop_gradient(class_logits), pred_points, target_classes,
                                target_points, class_weight=class_weight,
                                mask_weight=mask_weight, dice_weight=dice_weight)
  pred_index, matched = matching.hungarian_match(cost, target_valid)

  # Class of every prediction: its matched target's class, else no-object.
  assigned = matched[:, :, None] & (pred_index[:, :, None] == jnp.arange(num_preds))  # [B, K, M]
  has_target = assigned.any(axis=1)
  matched_class = jnp.einsum('bkm,bk->bm', assigned.astype(jnp.int32), target_classes)
  pred_classes = jnp.where(has_target, matched_class, num_classes)
  loss_ce = _weighted_class_ce(class_logits, pred_classes, no_object_weight)

  # Mask terms on importance-sampled points of each (prediction, target) pair.
  pred_rows = (jnp.arange(batch)[:, None] * num_preds + pred_index).reshape(-1)
  pair_coords = uncertain_point_coords(pair_uniform, flat_preds, pred_rows, num_points,
                                       oversample_ratio, importance_sample_ratio)
  pair_logits = point_sample(flat_preds, pair_coords, pred_rows)
  pair_labels = point_sample(flat_targets, pair_coords)
  weight = matched.reshape(-1).astype(jnp.float32)
  loss_mask = (sigmoid_bce(pair_logits, pair_labels) * weight).sum() / num_masks
  loss_dice = (dice(pair_logits, pair_labels) * weight).sum() / num_masks
  return loss_ce, loss_mask, loss_dice


def set_criterion(outputs: Sequence, targets, key, *, num_classes: int, class_weight: float = 2.0,
                  mask_weight: float = 5.0, dice_weight: float = 5.0,
                  no_object_weight: float = NO_OBJECT_WEIGHT, num_points: int = NUM_POINTS,
                  oversample_ratio: float = OVERSAMPLE_RATIO,
                  importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
                  aux_class_loss: bool = False):
  """MaskCLIP's loss: Hungarian matching, then 2·CE + 5·BCE + 5·dice, with deep supervision.

  outputs: a list of (class_logits [B, M, C+1], mask_logits [B, M, h, w]) pairs, the final
    prediction LAST (earlier entries are the intermediate RMA layers). The last class is
    "no object".
  targets: (target_masks [B, K, H, W] bool/float, target_classes [B, K] int,
    target_valid [B, K] bool); padding rows have valid False. H, W may differ from h, w
    (points are in normalised coordinates). Valid classes must lie in [0, num_classes).
  key: a jax.random key for the matcher's and the loss's points.

  Every layer is matched on its own. The class term is a weighted mean over all B·M
  queries (weight no_object_weight for unmatched ones); BCE and dice are summed over
  matched pairs and divided by num_masks = max(1, number of valid targets in the batch).
  The public code drops the class term of the intermediate layers (their class logits are
  the final layer's in MaskCLIP); aux_class_loss=True keeps it. An image without targets
  only contributes no-object cross-entropy.

  num_masks is global over the batch passed in: under `jax.jit` with a batch sharded by
  `NamedSharding`, sums are over the whole global batch, so this equals the public code's
  all-reduced count (there each device divides by world-average count, and data parallel
  averages gradients); checked on 8 simulated devices: loss and gradients equal the
  unsharded ones. The small cost matrices are gathered to one device for the matcher (XLA
  logs an "involuntary full rematerialization" warning for that). Inside `shard_map` the
  count would be per-device; do not use it there without a psum.
  Returns (loss scalar, metrics dict of scalars: weighted total parts and num_masks).
  """
  if not outputs:
    raise UserError('set_criterion needs at least one (class_logits, mask_logits) output.')
  target_masks, target_classes, target_valid = targets
  target_valid = target_valid.astype(jnp.bool_)
  target_classes = jnp.where(target_valid, target_classes, 0).astype(jnp.int32)
  for i, (class_logits, mask_logits) in enumerate(outputs):
    if class_logits.shape[-1] != num_classes + 1:
      raise UserError(f'output {i} has {class_logits.shape[-1]} class logits; expected '
                      f'num_classes + 1 = {num_classes + 1} (the last is "no object").')
    if class_logits.shape[:2] != mask_logits.shape[:2]:
      raise UserError(f'output {i}: class logits {class_logits.shape} and mask logits '
                      f'{mask_logits.shape} disagree on batch or number of masks.')
  if target_masks.shape[:2] != target_classes.shape or target_valid.shape != target_classes.shape:
    raise UserError(f'targets disagree: masks {target_masks.shape}, classes '
                    f'{target_classes.shape}, valid {target_valid.shape}.')

  num_masks = jnp.maximum(target_valid.sum().astype(jnp.float32), 1.0)
  batch, num_targets = target_classes.shape
  per_pair = num_uniform_points(num_points, oversample_ratio, importance_sample_ratio)
  match_size = batch * num_points * 2
  options = dict(class_weight=class_weight, mask_weight=mask_weight, dice_weight=dice_weight,
                 no_object_weight=no_object_weight, num_points=num_points,
                 oversample_ratio=oversample_ratio,
                 importance_sample_ratio=importance_sample_ratio)
  metrics = {'num_masks': num_masks}
  total = jnp.zeros((), jnp.float32)
  last = len(outputs) - 1
  for i, (class_logits, mask_logits) in enumerate(outputs):
    # One draw per layer: each random call costs ~1 s of CPU compile time, and one draw
    # for all layers at once would hold every layer's points in memory together.
    uniform = jax.random.uniform(jax.random.fold_in(key, i),
                                 (match_size + batch * num_targets * per_pair * 2,))
    match_coords = uniform[:match_size].reshape(batch, num_points, 2)
    pair_uniform = uniform[match_size:].reshape(batch * num_targets, per_pair, 2)
    loss_ce, loss_mask, loss_dice = _layer_losses(
        class_logits, mask_logits, (target_masks, target_classes, target_valid), num_masks,
        match_coords, pair_uniform, **options)
    suffix = '' if i == last else f'_{i}'
    if i == last or aux_class_loss:
      metrics['loss_ce' + suffix] = class_weight * loss_ce
    metrics['loss_mask' + suffix] = mask_weight * loss_mask
    metrics['loss_dice' + suffix] = dice_weight * loss_dice
  for name, value in metrics.items():
    if name.startswith('loss_'):
      total = total + value
  metrics['loss'] = total
  return total, metrics
