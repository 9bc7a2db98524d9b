"""Gaussian diffusion core: q(x_i | x₀), the posterior, p(x_{i-1} | x_i), one-step updates.

`i` is always a step index of the given schedule (for an unrespaced schedule it
equals the original timestep), a scalar or one index per example. Results
match guided_diffusion's GaussianDiffusion in float32.
"""

import math
from typing import Optional

import jax.numpy as jnp

from visgen_jax.diffusion import parameterisations as param
from visgen_jax.diffusion import schedules
from visgen_jax.errors import UserError


def extract(arr, i, ndim: int):
  """arr[i], shaped to broadcast against an ndim-array batched on axis 0."""
  v = jnp.asarray(arr)[i]
  if v.ndim == 1:
    v = v.reshape((-1,) + (1,) * (ndim - 1))
  return v


def coefs_at(sched: schedules.Schedule, i, ndim: int) -> param.Coefs:
  sched = schedules.to_device(sched)
  return param.Coefs(*(extract(getattr(sched, f), i, ndim) for f in (
      'alphas_cumprod', 'sqrt_alphas_cumprod', 'sqrt_one_minus_alphas_cumprod',
      'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod')))


def q_sample(schedule, x0, i, noise):
  """x_i = √ᾱ_i x₀ + √(1-ᾱ_i) ε."""
  sched = schedules.to_device(schedule)
  return (extract(sched.sqrt_alphas_cumprod, i, x0.ndim) * x0 +
          extract(sched.sqrt_one_minus_alphas_cumprod, i, x0.ndim) * noise)


def q_posterior_mean_variance(schedule, x0, x_t, i):
  """Mean, variance and clipped log-variance of q(x_{i-1} | x_i, x₀)."""
  sched = schedules.to_device(schedule)
  n = x_t.ndim
  mean = (extract(sched.posterior_mean_coef1, i, n) * x0 +
          extract(sched.posterior_mean_coef2, i, n) * x_t)
  return (mean, extract(sched.posterior_variance, i, n),
          extract(sched.posterior_log_variance_clipped, i, n))


def check_variance(variance: str) -> None:
  if variance not in param.VARIANCES:
    raise UserError(f'variance={variance!r} is unknown; allowed: {", ".join(param.VARIANCES)}.')


def model_log_variance(schedule, i, ndim: int, variance: str, var_values=None):
  """Log-variance of p(x_{i-1} | x_i) for a fixed or learned-range variance."""
  sched = schedules.to_device(schedule)
  if variance == 'learned_range':
    return param.learned_range_log_variance(
        var_values, extract(sched.posterior_log_variance_clipped, i, ndim),
        extract(sched.log_betas, i, ndim))
  if variance == 'fixed_large':
    return extract(sched.fixed_large_log_variance, i, ndim)
  return extract(sched.posterior_log_variance_clipped, i, ndim)


def p_mean_variance(schedule, output, x_t, i, *, prediction: str = 'eps',
                    learn_sigma: bool = False, variance: str = 'fixed_large',
                    clip_denoised: bool = True, dynamic_threshold: Optional[float] = None):
  """p(x_{i-1} | x_i) from a network output: dict(mean, variance, log_variance, pred_xstart).

  With learn_sigma the output has 2C channels and the variance is ADM's learned
  range (the `variance` argument is then ignored).
  """
  mean_out, var_values = param.split_output(output, x_t.shape, learn_sigma)
  c = coefs_at(schedule, i, x_t.ndim)
  x0 = param.process_x0(param.to_x0(mean_out, x_t, c, prediction), clip_denoised,
                        dynamic_threshold)
  kind = 'learned_range' if learn_sigma else variance
  log_var = jnp.broadcast_to(model_log_variance(schedule, i, x_t.ndim, kind, var_values),
                             x_t.shape)
  if kind == 'fixed_small':
    # Unclipped, as guided_diffusion reports it (0 at step 0; only its log is clipped).
    var = jnp.broadcast_to(
        extract(schedules.to_device(schedule).posterior_variance, i, x_t.ndim), x_t.shape)
  else:
    var = jnp.exp(log_var)
  mean, _, _ = q_posterior_mean_variance(schedule, x0, x_t, i)
  return dict(mean=mean, variance=var, log_variance=log_var, pred_xstart=x0)


def ddpm_update(mean, log_variance, noise, i):
  """Ancestral step x_{i-1} = μ + σ z, without noise at step 0."""
  nonzero = (jnp.asarray(i) != 0).astype(mean.dtype)
  if nonzero.ndim == 1:
    nonzero = nonzero.reshape((-1,) + (1,) * (mean.ndim - 1))
  return mean + nonzero * jnp.exp(0.5 * log_variance) * noise


def ddim_update(schedule, x0, eps, i, eta: float = 0.0, noise=None):
  """DDIM (Song et al. Eq. 12) from step i to i-1; noise may be None when η = 0."""
  sched = schedules.to_device(schedule)
  n = x0.ndim
  ab = extract(sched.alphas_cumprod, i, n)
  ab_prev = extract(sched.alphas_cumprod_prev, i, n)
  mean = x0 * jnp.sqrt(ab_prev)
  if eta == 0:
    return mean + jnp.sqrt(1 - ab_prev) * eps
  sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
  mean = mean + jnp.sqrt(1 - ab_prev - sigma ** 2) * eps
  nonzero = (jnp.asarray(i) != 0).astype(x0.dtype)
  if nonzero.ndim == 1:
    nonzero = nonzero.reshape((-1,) + (1,) * (n - 1))
  return mean + nonzero * sigma * noise


def ddim_reverse_update(schedule, x0, eps, i):
  """Deterministic DDIM step from step i up to i+1 (inversion)."""
  ab_next = extract(schedules.to_device(schedule).alphas_cumprod_next, i, x0.ndim)
  return x0 * jnp.sqrt(ab_next) + jnp.sqrt(1 - ab_next) * eps


# Likelihood terms (nats), for the variational bound.


def normal_kl(mean1, logvar1, mean2, logvar2):
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) +
                (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p of 8-bit data x ∈ [-1, 1] (bins of width 2/255) under N(means, e^{2 log_scales})."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vb_terms_bpd(schedule, output, x0, x_t, i, *, prediction: str = 'eps',
                 learn_sigma: bool = False, variance: str = 'fixed_large'):
  """One term of the variational bound in bits per dim, per example (i: [B]).

  KL(q(x_{i-1} | x_i, x₀) ‖ p(x_{i-1} | x_i)) for i > 0, the decoder NLL at i = 0.
  """
  true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, i)
  out = p_mean_variance(schedule, output, x_t, i, prediction=prediction,
                        learn_sigma=learn_sigma, variance=variance, clip_denoised=False)
  kl = mean_flat(normal_kl(true_mean, true_log_var, out['mean'], out['log_variance']))
  nll = -discretized_gaussian_log_likelihood(x0, out['mean'], 0.5 * out['log_variance'])
  nll = mean_flat(nll)
  return jnp.where(jnp.asarray(i) == 0, nll, kl) / math.log(2.0)
