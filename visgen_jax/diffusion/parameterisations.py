"""What the network predicts (ε, x₀ or v), learned variance, and x̂₀ clipping.

Coefficients are per-step scalars or arrays that broadcast against x (the
samplers pass scalars: every example of a batch is at the same step).
Formulas follow guided_diffusion's `_predict_xstart_from_eps` /
`_predict_eps_from_xstart` so that float32 results match it.
"""

from typing import Any, NamedTuple, Optional

import jax.numpy as jnp

from visgen_jax.errors import UserError

PREDICTIONS = ('eps', 'x0', 'v')
VARIANCES = ('fixed_large', 'fixed_small', 'learned_range')


class Coefs(NamedTuple):
  """ᾱ-derived scalars at one step."""
  alpha_bar: Any
  sqrt_alpha_bar: Any
  sqrt_one_minus_alpha_bar: Any
  sqrt_recip_alpha_bar: Any
  sqrt_recipm1_alpha_bar: Any

  @classmethod
  def from_alpha_bar(cls, alpha_bar):
    return cls(alpha_bar, jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar), jnp.sqrt(1 / alpha_bar),
               jnp.sqrt(1 / alpha_bar - 1))

  @classmethod
  def from_sigma(cls, sigma):
    """From σ = √((1-ᾱ)/ᾱ), without the cancellation of going through ᾱ."""
    root = jnp.sqrt(1 + sigma ** 2)
    return cls(1 / root ** 2, 1 / root, sigma / root, root, sigma)


def check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise UserError(f'prediction={prediction!r} is unknown; allowed: {", ".join(PREDICTIONS)}.')


def x0_from_eps(x_t, eps, c: Coefs):
  return c.sqrt_recip_alpha_bar * x_t - c.sqrt_recipm1_alpha_bar * eps


def eps_from_x0(x_t, x0, c: Coefs):
  return (c.sqrt_recip_alpha_bar * x_t - x0) / c.sqrt_recipm1_alpha_bar


def x0_from_v(x_t, v, c: Coefs):
  return c.sqrt_alpha_bar * x_t - c.sqrt_one_minus_alpha_bar * v


def v_from_x0_eps(x0, eps, c: Coefs):
  return c.sqrt_alpha_bar * eps - c.sqrt_one_minus_alpha_bar * x0


def to_x0(output, x_t, c: Coefs, prediction: str):
  """x̂₀ from the network's (mean-part) output."""
  if prediction == 'eps':
    return x0_from_eps(x_t, output, c)
  if prediction == 'x0':
    return output
  return x0_from_v(x_t, output, c)


def target(x0, noise, c: Coefs, prediction: str):
  """Regression target of the network for x_t = √ᾱ x₀ + √(1-ᾱ) ε."""
  if prediction == 'eps':
    return noise
  if prediction == 'x0':
    return x0
  return v_from_x0_eps(x0, noise, c)


def split_output(output, x_shape, learn_sigma: bool):
  """(mean part, variance values or None); learned variance is the 2nd half of channels."""
  channels = x_shape[-1]
  want = 2 * channels if learn_sigma else channels
  if output.shape[:-1] != tuple(x_shape[:-1]) or output.shape[-1] != want:
    raise UserError(f'the denoiser returned shape {tuple(output.shape)} for x of shape '
                    f'{tuple(x_shape)}; with learn_sigma={learn_sigma} it must return '
                    f'{want} channels (last axis).')
  if learn_sigma:
    return output[..., :channels], output[..., channels:]
  return output, None


def learned_range_log_variance(var_values, min_log, max_log):
  """ADM's learned range: v ∈ [-1, 1] interpolates log σ² between β̃ and β."""
  frac = (var_values + 1) / 2
  return frac * max_log + (1 - frac) * min_log


def process_x0(x0, clip_denoised: bool = True, dynamic_threshold: Optional[float] = None):
  """Static clipping to [-1, 1] or Imagen's dynamic thresholding at a percentile.

  Dynamic thresholding: s = max(1, quantile(|x̂₀|, p)) per example, then
  x̂₀ ← clip(x̂₀, -s, s) / s.
  """
  if dynamic_threshold is not None:
    flat = jnp.abs(x0).reshape(x0.shape[0], -1)
    s = jnp.maximum(jnp.quantile(flat, dynamic_threshold, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s
  if clip_denoised:
    return jnp.clip(x0, -1, 1)
  return x0
