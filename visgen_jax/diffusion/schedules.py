"""Noise schedules as pytrees: named β schedules, respacing, σ/t conversions.

A `Schedule` holds, per step i of its own (possibly respaced) chain, the
quantities guided_diffusion precomputes. They are computed in float64 on the
host, as guided_diffusion does, and kept as NumPy arrays until they enter a
traced function, where they become float32 like guided_diffusion's
`_extract_into_tensor`. `timesteps[i]` is the ORIGINAL timestep of step i: the
denoiser always sees original timesteps (guided_diffusion's `_WrappedModel`
with rescale_timesteps=False).
"""

import math
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.errors import UserError

Array = Any


@flax.struct.dataclass
class Schedule:
  timesteps: Array  # [S] int32, original timestep of each step.
  betas: Array
  alphas_cumprod: Array
  alphas_cumprod_prev: Array
  alphas_cumprod_next: Array
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  log_one_minus_alphas_cumprod: Array
  sqrt_recip_alphas_cumprod: Array
  sqrt_recipm1_alphas_cumprod: Array
  posterior_variance: Array
  posterior_log_variance_clipped: Array
  posterior_mean_coef1: Array
  posterior_mean_coef2: Array
  # Variances of p(x_{i-1} | x_i) for ADM's fixed-large choice, with the
  # first entry replaced as guided_diffusion does for a better decoder NLL.
  fixed_large_variance: Array
  fixed_large_log_variance: Array
  log_betas: Array  # upper end of the learned-range interpolation.

  @property
  def num_steps(self) -> int:
    return int(np.shape(self.betas)[0])


def from_betas(betas, timesteps=None) -> Schedule:
  """Schedule from a 1-D array of β in (0, 1]; timesteps default to 0..S-1."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size == 0:
    raise UserError(f'betas must be a non-empty 1-D array, got shape {betas.shape}.')
  if not np.all((betas > 0) & (betas <= 1)):
    raise UserError('betas must all lie in (0, 1].')
  n = betas.shape[0]
  timesteps = np.arange(n) if timesteps is None else np.asarray(timesteps)
  if timesteps.shape != (n,):
    raise UserError(f'timesteps has shape {timesteps.shape}, expected ({n},).')
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.append(1.0, ac[:-1])
  ac_next = np.append(ac[1:], 0.0)
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  # The posterior variance is 0 at step 0; its log is clipped to step 1's.
  post_log_var = np.log(np.append(post_var[1], post_var[1:])) if n > 1 else np.log(
      np.maximum(post_var, 1e-20))
  large_var = np.append(post_var[1], betas[1:]) if n > 1 else betas.copy()
  return Schedule(
      timesteps=timesteps.astype(np.int32),
      betas=betas,
      alphas_cumprod=ac,
      alphas_cumprod_prev=ac_prev,
      alphas_cumprod_next=ac_next,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      log_one_minus_alphas_cumprod=np.log(1.0 - ac),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
      posterior_variance=post_var,
      posterior_log_variance_clipped=post_log_var,
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
      fixed_large_variance=large_var,
      fixed_large_log_variance=np.log(large_var),
      log_betas=np.log(betas),
  )


def _betas_for_alpha_bar(n, alpha_bar, max_beta=0.999):
  t1 = np.arange(n) / n
  t2 = np.arange(1, n + 1) / n
  return np.minimum(1 - alpha_bar(t2) / alpha_bar(t1), max_beta)


_CONST = re.compile(r'^const(\d+(?:\.\d*)?(?:e-?\d+)?)$')


def named_betas(noise_schedule: str, num_timesteps: int) -> np.ndarray:
  """β of 'linear' (Ho et al.), 'cosine' (Nichol & Dhariwal) or 'const<β>'.

  Every schedule is defined for 1000 steps and stretched to `num_timesteps`,
  as guided_diffusion (and Patch-DM's 'const0.008' latent schedule) do.
  """
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
    raise UserError(f'num_timesteps must be a positive integer, got {num_timesteps!r}.')
  scale = 1000 / num_timesteps
  if noise_schedule == 'linear':
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
  if noise_schedule == 'cosine':
    return _betas_for_alpha_bar(
        num_timesteps, lambda t: np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
  m = _CONST.match(noise_schedule)
  if m:
    beta = scale * float(m.group(1))
    if not 0 < beta <= 1:
      raise UserError(f'noise_schedule={noise_schedule!r} with {num_timesteps} steps gives '
                      f'β={beta}; β must lie in (0, 1].')
    return np.full(num_timesteps, beta, dtype=np.float64)
  raise UserError(f'noise_schedule={noise_schedule!r} is unknown; allowed: linear, cosine, '
                  'const<β> (e.g. const0.008).')


def make_schedule(noise_schedule: str, num_timesteps: int) -> Schedule:
  """Named schedule of `num_timesteps` steps (no respacing)."""
  return from_betas(named_betas(noise_schedule, num_timesteps))


def space_timesteps(num_steps: int, spacing: str) -> list[int]:
  """Steps kept by guided_diffusion's spacing strings, sorted ascending.

  'ddimN': the integer stride giving exactly N steps (DDIM paper);
  'N' or 'N1,N2,...': split the chain into equal sections and take Nk steps
  from section k at evenly rounded fractional strides.
  """
  if not isinstance(spacing, str) or not spacing:
    raise UserError(f'timestep spacing must be a non-empty string such as "ddim50", "250" or '
                    f'"10,10,10", got {spacing!r}.')
  if spacing.startswith('ddim'):
    try:
      want = int(spacing[4:])
    except ValueError:
      raise UserError(f'timestep spacing {spacing!r}: expected "ddim<int>".') from None
    if want < 1 or want > num_steps:
      raise UserError(f'timestep spacing {spacing!r} asks for {want} steps of a {num_steps}-step '
                      f'schedule; allowed: 1..{num_steps}.')
    for stride in range(1, num_steps + 1):
      if len(range(0, num_steps, stride)) == want:
        return list(range(0, num_steps, stride))
    raise UserError(f'timestep spacing {spacing!r}: no integer stride gives exactly {want} of '
                    f'{num_steps} steps; use "{want}" for fractional strides.')
  try:
    counts = [int(c) for c in spacing.split(',')]
  except ValueError:
    raise UserError(f'timestep spacing {spacing!r}: expected "ddimN" or comma-separated '
                    'integers.') from None
  if len(counts) > num_steps:
    raise UserError(f'timestep spacing {spacing!r} has more sections than the {num_steps} steps.')
  size_per, extra = divmod(num_steps, len(counts))
  start, steps = 0, []
  for k, count in enumerate(counts):
    size = size_per + (1 if k < extra else 0)
    if count < 1 or count > size:
      raise UserError(f'timestep spacing {spacing!r}: section {k} has {size} steps and cannot '
                      f'take {count}; each count must lie in 1..{size}.')
    stride = 1 if count == 1 else (size - 1) / (count - 1)
    steps += [start + round(j * stride) for j in range(count)]
    start += size
  return sorted(set(steps))


def respace(schedule: Schedule, spacing: str) -> Schedule:
  """Keep the steps chosen by `spacing`, with β recomputed so that ᾱ is kept.

  Respacing a respaced schedule composes: the map to original timesteps is
  carried through.
  """
  keep = space_timesteps(schedule.num_steps, spacing)
  ac = np.asarray(schedule.alphas_cumprod, dtype=np.float64)[keep]
  betas = 1.0 - ac / np.append(1.0, ac[:-1])
  return from_betas(betas, np.asarray(schedule.timesteps)[keep])


def to_device(schedule: Schedule) -> Schedule:
  """Leaves as float32 / int32 jax arrays (what traced code indexes)."""
  return Schedule(**{
      f: jnp.asarray(getattr(schedule, f), jnp.int32 if f == 'timesteps' else jnp.float32)
      for f in Schedule.__dataclass_fields__
  })


# Continuous noise levels, for the samplers that step on σ (EDM/Karras).
# σ = sqrt((1 - ᾱ) / ᾱ); the VP state is x / sqrt(1 + σ²) for the VE state x.


def sigmas(schedule: Schedule) -> np.ndarray:
  """σ of every step (float64, increasing); needs a concrete (not traced) schedule."""
  if isinstance(schedule.alphas_cumprod, jax.core.Tracer):
    raise UserError('the σ-stepping samplers (euler, heun, dpmpp_2m) build their noise levels '
                    'on the host: close over the schedule instead of passing it as a traced '
                    'argument of jit.')
  ac = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
  return np.sqrt((1 - ac) / ac)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
  """Karras et al.'s n noise levels from σ_max down to σ_min, then 0."""
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise UserError(f'number of steps must be a positive integer, got {n!r}.')
  ramp = np.linspace(0, 1, n) if n > 1 else np.zeros(1)
  inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  s = (inv_max + ramp * (inv_min - inv_max)) ** rho
  return np.append(s, 0.0)


def t_from_sigma(schedule: Schedule, sigma):
  """Fractional ORIGINAL timestep whose σ is `sigma` (linear in log σ between steps)."""
  log_s = jnp.log(jnp.asarray(sigmas(schedule), jnp.float32))
  steps = jnp.arange(schedule.num_steps, dtype=jnp.float32)
  idx = jnp.interp(jnp.log(sigma), log_s, steps)
  return jnp.interp(idx, steps, jnp.asarray(schedule.timesteps, jnp.float32))


def sigma_from_t(schedule: Schedule, t):
  """Inverse of `t_from_sigma`: exact table values at the schedule's timesteps."""
  log_s = jnp.log(jnp.asarray(sigmas(schedule), jnp.float32))
  ts = jnp.asarray(schedule.timesteps, jnp.float32)
  return jnp.exp(jnp.interp(jnp.asarray(t, jnp.float32), ts, log_s))
