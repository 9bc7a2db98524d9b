"""Guidance: classifier-free (batch doubling), classifier gradients, loss-on-x̂₀ guidance."""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from visgen_jax.errors import UserError

CFG_CONVENTIONS = ('cfg_plus', 'interp')


def check_finite(value, what: str) -> None:
  """UserError when a concrete scalar is NaN or infinite (traced values pass)."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise UserError(f'{what} must be a real number, got {value!r}.') from None
  if not math.isfinite(v):
    raise UserError(f'{what} must be finite, got {v}.')


def classifier_free(denoise_fn: Callable, weight, uncond: dict, *,
                    convention: str = 'cfg_plus', learn_sigma: bool = False) -> Callable:
  """denoise_fn'(x, t, **cond) mixing a conditional and an unconditional branch.

  Both branches run as one call on a doubled batch. The unconditional branch
  uses `cond` with the entries of `uncond` replaced (each broadcast to the
  replaced value's shape), so several conditions can be dropped separately,
  e.g. Patch-DM's global code and position embedding. Conventions:
    'cfg_plus': ε̃ = (1 + w) ε_c − w ε_∅   (w = 0: no guidance)
    'interp':   ε̃ = w ε_c + (1 − w) ε_∅   (w = 1: no guidance)
  Both weights sum to one, so mixing x₀- or v-outputs is the same as mixing ε.
  With learn_sigma only the first half of the channels is mixed; the learned
  variance comes from the conditional branch.
  """
  check_finite(weight, 'the classifier-free guidance weight')
  if convention not in CFG_CONVENTIONS:
    raise UserError(f'cfg convention={convention!r} is unknown; allowed: '
                    f'{", ".join(CFG_CONVENTIONS)}.')
  if not isinstance(uncond, dict) or not uncond:
    raise UserError('classifier-free guidance needs `uncond`, a non-empty dict of condition '
                    'overrides for the unconditional branch.')
  w_c, w_u = (1 + weight, -weight) if convention == 'cfg_plus' else (weight, 1 - weight)

  def guided(x, t, **cond):
    missing = sorted(set(uncond) - set(cond))
    if missing:
      raise UserError(f'uncond overrides {missing} name no condition passed to the denoiser; '
                      f'conditions: {sorted(cond)}.')
    doubled = {}
    for name, value in cond.items():
      other = uncond.get(name, value)
      doubled[name] = jax.tree.map(
          lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, c.shape).astype(c.dtype)]),
          value, other)
    out = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), **doubled)
    out_c, out_u = jnp.split(out, 2, axis=0)
    if learn_sigma:
      ch = x.shape[-1]
      mixed = w_c * out_c[..., :ch] + w_u * out_u[..., :ch]
      return jnp.concatenate([mixed, out_c[..., ch:]], axis=-1)
    return w_c * out_c + w_u * out_u

  return guided


def classifier_gradient(log_prob_fn: Callable, scale: float = 1.0) -> Callable:
  """cond_fn(x_t, t, **cond) = scale · ∇ₓ Σ_b log p(y_b | x_t) for the samplers' `cond_fn`.

  log_prob_fn(x_t, t, **cond) -> [B] log-probabilities of the wanted labels.
  """
  check_finite(scale, 'the classifier guidance scale')

  def cond_fn(x, t, **cond):
    return scale * jax.grad(lambda x: jnp.sum(log_prob_fn(x, t, **cond)))(x)

  return cond_fn


@dataclasses.dataclass(frozen=True)
class LossGuidance:
  """x_{i-1} ← x_{i-1} − scale · ∇_{x_i} Σ_b loss_fn(x̂₀(x_i)) on chosen steps.

  Gen2Res's skip guidance: every=10, scale=0.3, loss = l2_to(reference);
  every=1 is DPS-style. A step i (counting down from S-1 to 0) is guided when
  (i + 1) % every == 0 or i >= S - top_steps, and i >= min_step (Gen2Res's
  `skip`, `last`, `first`). The gradient flows through the denoiser.
  """
  loss_fn: Callable  # x̂₀ [B, ...] -> per-example [B] (or scalar) loss.
  scale: float = 0.3
  every: int = 10
  top_steps: int = 0
  min_step: int = 0

  def validate(self) -> None:
    check_finite(self.scale, 'LossGuidance.scale')
    for name in ('every', 'top_steps', 'min_step'):
      v = getattr(self, name)
      if not isinstance(v, int) or v < (1 if name == 'every' else 0):
        raise UserError(f'LossGuidance.{name} must be an integer >= '
                        f'{1 if name == "every" else 0}, got {v!r}.')

  def guided(self, i: int, num_steps: int) -> bool:
    return (((i + 1) % self.every == 0 or i >= num_steps - self.top_steps)
            and i >= self.min_step)


def l2_to(reference) -> Callable:
  """Per-example Euclidean distance ‖reference − x̂₀‖₂ (Gen2Res's guidance loss)."""

  def loss(x0):
    diff = (reference - x0).reshape(x0.shape[0], -1)
    return jnp.sqrt(jnp.sum(diff ** 2, axis=1))

  return loss
