"""A Gaussian mixture with a closed-form denoiser: ground truth for sampler tests and benchmarks.

For data x₀ ~ Σ_k π_k N(μ_k, s_k² I), the diffused x_t = √ᾱ x₀ + √(1-ᾱ) ε is
again a mixture, and E[x₀ | x_t] is exact, so every sampler can be checked
against the true distribution (or the exact ODE flow) without training.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from visgen_jax.diffusion import parameterisations as param
from visgen_jax.diffusion import schedules


class GaussianMixture(NamedTuple):
  weights: jax.Array  # [K], sums to 1.
  means: jax.Array  # [K, D]
  stds: jax.Array  # [K]

  def sample(self, key, n: int):
    k_key, x_key = jax.random.split(key)
    comp = jax.random.choice(k_key, len(self.weights), (n,), p=self.weights)
    z = jax.random.normal(x_key, (n, self.means.shape[1]))
    return self.means[comp] + self.stds[comp, None] * z

  def posterior_mean(self, x_t, c: param.Coefs):
    """E[x₀ | x_t] for x_t [B, D] at levels with coefficients c of shape [B]."""
    dim = self.means.shape[1]
    ab, sqrt_ab = c.alpha_bar[:, None], c.sqrt_alpha_bar[:, None]  # [B, 1]
    var = ab * self.stds ** 2 + (1 - ab)  # [B, K]
    diff = x_t[:, None, :] - sqrt_ab[..., None] * self.means  # [B, K, D]
    logits = (jnp.log(self.weights) - 0.5 * dim * jnp.log(var) -
              0.5 * jnp.sum(diff ** 2, -1) / var)
    resp = jax.nn.softmax(logits, axis=-1)
    gain = sqrt_ab * self.stds ** 2 / var  # [B, K]
    x0_k = self.means + gain[..., None] * diff
    return jnp.sum(resp[..., None] * x0_k, axis=1)

  def denoise_fn(self, schedule: schedules.Schedule, prediction: str = 'eps'):
    """denoise_fn(x_t, t) with exact outputs at ORIGINAL (possibly fractional) timesteps t.

    The level of t is read from `schedule` (σ interpolated in log between its
    timesteps, as the σ-stepping samplers map σ to t).
    """
    param.check_prediction(prediction)

    def fn(x_t, t):
      c = param.Coefs.from_sigma(schedules.sigma_from_t(schedule, t))
      x0 = self.posterior_mean(x_t, c)
      if prediction == 'x0':
        return x0
      c = param.Coefs(*(v[:, None] for v in c))
      eps = (x_t - c.sqrt_alpha_bar * x0) / c.sqrt_one_minus_alpha_bar
      return eps if prediction == 'eps' else param.v_from_x0_eps(x0, eps, c)

    return fn


def default_mixture() -> GaussianMixture:
  """Three well-separated 2-D components of unequal weight inside [-1, 1]²."""
  return GaussianMixture(weights=jnp.array([0.5, 0.3, 0.2]),
                         means=jnp.array([[-0.5, -0.3], [0.4, 0.5], [0.5, -0.5]]),
                         stds=jnp.array([0.08, 0.12, 0.05]))


def mmd(x, y, bandwidths=(0.02, 0.05, 0.1, 0.2)):
  """Biased squared maximum mean discrepancy with a sum of Gaussian kernels."""

  def k(a, b):
    d2 = jnp.sum((a[:, None] - b[None]) ** 2, -1)
    return sum(jnp.exp(-d2 / (2 * h ** 2)) for h in bandwidths)

  return jnp.mean(k(x, x)) + jnp.mean(k(y, y)) - 2 * jnp.mean(k(x, y))
