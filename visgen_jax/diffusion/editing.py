"""Editing plans: RePaint inpainting / outpainting and the SDEdit-style start.

The samplers run a static plan of operations in one `lax.scan`: a `down` step
i takes the state from noise level i to i-1 with the model (level -1 is clean
data); an `up` step i re-noises it from level i-1 to i with q(x_i | x_{i-1}).
"""

import dataclasses
from typing import Any, Optional

import numpy as np

from visgen_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Inpaint:
  """Known-region replacement after every down step (RePaint, Lugmayr et al.).

  known: image [B, ...] like x; mask: 1 where `known` is kept, broadcastable
  to x (e.g. [B, H, W, 1] or [H, W, 1]). After the step to level i-1 the known
  region is replaced by q_sample(known, i-1), and by `known` itself at the
  end, so the result equals `known` there. RePaint's resampling: after every
  `jump_length` down steps, go back up `jump_length` steps, `resamples - 1`
  times per jump point (jump_length=1, resamples=1: plain replacement).
  """
  known: Any
  mask: Any
  jump_length: int = 1
  resamples: int = 1

  def validate(self, x_shape) -> None:
    known_shape = tuple(np.shape(self.known))
    if known_shape != tuple(x_shape):
      raise UserError(f'Inpaint.known has shape {known_shape}; it must equal the sample shape '
                      f'{tuple(x_shape)}.')
    mask_shape = tuple(np.shape(self.mask))
    try:
      out = np.broadcast_shapes(mask_shape, tuple(x_shape))
    except ValueError:
      out = None
    if out != tuple(x_shape):
      raise UserError(f'Inpaint.mask has shape {mask_shape}, which does not broadcast to the '
                      f'sample shape {tuple(x_shape)}; use e.g. [B, H, W, 1] with 1 = known.')
    for name in ('jump_length', 'resamples'):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise UserError(f'Inpaint.{name} must be an integer >= 1, got {v!r}.')


def check_start_step(start_step: Optional[int], num_steps: int) -> int:
  """The level K the reverse process starts from: K steps of S remain (None: all)."""
  if start_step is None:
    return num_steps
  if not isinstance(start_step, (int, np.integer)) or not 0 <= start_step <= num_steps:
    raise UserError(f'start_step={start_step!r} must be an integer in [0, {num_steps}] (the '
                    'number of reverse steps of the schedule to run).')
  return int(start_step)


def plan(start: int, jump_length: int = 1, resamples: int = 1):
  """(step index, is_up) pairs from level start-1 down to clean data.

  Jump points are the levels 0, L, 2L, ... below start-1-L; on reaching one
  (after a down step), the plan climbs L levels again, resamples-1 times.
  """
  remaining = {j: resamples - 1 for j in range(0, start - jump_length, jump_length)}
  ops, level = [], start - 1
  while level >= 0:
    ops.append((level, False))
    level -= 1
    if remaining.get(level, 0) > 0:
      remaining[level] -= 1
      for _ in range(jump_length):
        level += 1
        ops.append((level, True))
  steps = np.array([s for s, _ in ops], np.int32).reshape(-1)
  up = np.array([u for _, u in ops], bool).reshape(-1)
  return steps, up
