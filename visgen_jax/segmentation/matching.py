"""Bipartite matching between predicted masks and ground-truth masks.

`matching_cost` builds the [B, M, K] cost of assigning prediction m to target k from the
class probabilities and from mask logits / labels already sampled at shared points (the
point sampling lives in `losses`); `hungarian_match` solves one assignment per image with
scipy on the host, and works inside `jax.jit`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

# scipy refuses NaN / inf costs; a diverged model still gets an assignment (its loss is
# NaN anyway, which is where the trainer sees it).
_FINITE_LIMIT = 1e30


def matching_cost(class_logits, point_logits, target_classes, point_labels, *,
                  class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0):
  """Cost [B, M, K] of matching each prediction to each target (lower is better).

  class_logits [B, M, C+1]; point_logits [B, M, P] mask logits at P points shared by every
  mask of an image; target_classes [B, K] int; point_labels [B, K, P] target masks at the
  same points, in [0, 1]. The terms follow Mask2Former's matcher, which MaskCLIP uses with
  the loss weights as cost weights: -softmax probability of the target class, the sigmoid
  cross-entropy averaged over points, and 1 - soft dice with +1 smoothing.
  """
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
  cost_class = -jnp.take_along_axis(probs, target_classes[:, None, :].astype(jnp.int32), axis=-1)

  logits = point_logits.astype(jnp.float32)
  labels = point_labels.astype(jnp.float32)
  num_points = logits.shape[-1]
  # BCE(x, y) = softplus(-x)·y + softplus(x)·(1 - y): both parts are bilinear in (m, k).
  pos = jax.nn.softplus(-logits)
  neg = jax.nn.softplus(logits)
  cost_mask = (jnp.einsum('bmp,bkp->bmk', pos, labels)
               + jnp.einsum('bmp,bkp->bmk', neg, 1.0 - labels)) / num_points

  p = jax.nn.sigmoid(logits)
  numerator = 2.0 * jnp.einsum('bmp,bkp->bmk', p, labels)
  denominator = p.sum(-1)[:, :, None] + labels.sum(-1)[:, None, :]
  cost_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
  return class_weight * cost_class + mask_weight * cost_mask + dice_weight * cost_dice


def _assign_on_host(cost, valid):
  cost = np.nan_to_num(np.asarray(cost, np.float64), nan=_FINITE_LIMIT, posinf=_FINITE_LIMIT,
                       neginf=-_FINITE_LIMIT)
  valid = np.asarray(valid, bool)
  batch, _, num_targets = cost.shape
  pred_index = np.zeros((batch, num_targets), np.int32)
  matched = np.zeros((batch, num_targets), bool)
  for b in range(batch):
    columns = np.flatnonzero(valid[b])
    if columns.size == 0:
      continue
    rows, picked = linear_sum_assignment(cost[b][:, columns])
    pred_index[b, columns[picked]] = rows
    matched[b, columns[picked]] = True
  return pred_index, matched


def hungarian_match(cost, valid):
  """Minimum-cost one-to-one assignment per image, callable inside `jax.jit`.

  cost [B, M, K] (prediction × target), valid [B, K] bool (False = padding, never matched).
  Returns (pred_index [B, K] int32, matched [B, K] bool): target k of image b is matched to
  prediction pred_index[b, k] when matched[b, k]. With more valid targets than predictions
  only M of them are matched; unmatched rows have pred_index 0. No gradient flows through
  the assignment. The solve runs on the host (scipy's linear_sum_assignment) through
  `jax.pure_callback`; under a sharded jit the cost matrix is gathered to one device for it.
  """
  cost = jax.lax.stop_gradient(cost)
  batch, _, num_targets = cost.shape
  if valid.shape != (batch, num_targets):
    raise ValueError(f'valid has shape {valid.shape}, expected {(batch, num_targets)}.')
  result_shapes = (jax.ShapeDtypeStruct((batch, num_targets), jnp.int32),
                   jax.ShapeDtypeStruct((batch, num_targets), jnp.bool_))
  return jax.pure_callback(_assign_on_host, result_shapes, cost, valid.astype(jnp.bool_),
                           vmap_method='sequential')
