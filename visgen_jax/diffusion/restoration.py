"""Restoration by generation (Gen2Res, Ding et al.): diffuse a degraded image to a
level K−1, then run DDPM ancestral steps back to clean data, optionally with skip
guidance toward the input.

`restore` is the ddpm sampler's SDEdit start (`start_step`, `x_start`) plus its
loss-on-x̂₀ guidance (guidance.LossGuidance with guidance.l2_to), fixed to what
Gen2Res's public `p_sample_loop` does:
  x = q_sample(y, K−1); for t = K−1 … 0 (the FULL schedule, no respacing; the
  model's learned variance with learn_sigma):
    x_{t−1} = ancestral DDPM step of x_t (x̂₀ clipped to [−1, 1]);
    if guidance_scale and (t + 1) % guidance_every == 0:
      x_{t−1} ← x_{t−1} − guidance_scale · ∇_{x_t} Σ_b ‖y_b − clip(x̂₀(x_t))_b‖₂
      (the L2 norm over all pixels of an image, not squared; through the UNet).
t is the schedule's step index, which on the full schedule is the timestep: with
K = 200, n = 10 the steps t = 199, 189, …, 9 are guided (20 steps).
"""

from typing import Callable

import jax
import numpy as np

from visgen_jax.diffusion import guidance
from visgen_jax.diffusion import samplers
from visgen_jax.errors import UserError

DEFAULT_START_STEP = 200  # K
DEFAULT_GUIDANCE_SCALE = 0.3  # λ
DEFAULT_GUIDANCE_EVERY = 10  # n


def check_full_schedule(schedule) -> None:
  """UserError for a respaced schedule: Gen2Res steps through every timestep."""
  if not np.array_equal(np.asarray(schedule.timesteps), np.arange(schedule.num_steps)):
    raise UserError('restore runs DDPM on the full schedule; pass the schedule before respacing '
                    '(its timesteps must be 0 .. T-1).')


def restore(key, denoise_fn: Callable, schedule, y, *, start_step: int = DEFAULT_START_STEP,
            guidance_scale: float = 0.0, guidance_every: int = DEFAULT_GUIDANCE_EVERY,
            learn_sigma: bool = True, progress: bool = False):
  """y [B, H, W, C] in [−1, 1] diffused to level start_step−1 and denoised (see the module).

  guidance_scale = 0: plain restoration (Gen2Res's restore step); > 0: skip
  guidance toward y (its generative album, λ = 0.3). start_step = 0 returns y.
  Noise: x_T from the first half of split(key), step noise from the second
  (the ddpm sampler's fold_in(key, n) for its n-th step).
  """
  guidance.check_finite(guidance_scale, 'the guidance scale')
  check_full_schedule(schedule)
  loss_guidance = None
  if guidance_scale:
    loss_guidance = guidance.LossGuidance(guidance.l2_to(y), scale=guidance_scale,
                                          every=guidance_every)
  noise_key, step_key = jax.random.split(key)
  x_T = jax.random.normal(noise_key, y.shape, y.dtype)
  return samplers.ddpm(step_key, denoise_fn, schedule, x_T, learn_sigma=learn_sigma,
                       clip_denoised=True, loss_guidance=loss_guidance, start_step=start_step,
                       x_start=y, progress=progress)
