"""Training losses: ε/x₀/v regression (MSE or L1), ADM's hybrid loss for learned variance, P2 weighting."""

from typing import Callable

import jax
import jax.numpy as jnp

from visgen_jax.diffusion import gaussian
from visgen_jax.diffusion import parameterisations as param
from visgen_jax.diffusion import schedules
from visgen_jax.errors import UserError

LOSS_TYPES = ('mse', 'l1')


def p2_weight(schedule, gamma: float, k: float):
  """Choi et al.'s P2 weight 1 / (k + SNR)^γ per step, SNR = ᾱ / (1 - ᾱ); γ = 0 gives 1."""
  # From the float64-precomputed √(1/ᾱ - 1): 1 - ᾱ in float32 loses digits near ᾱ = 1.
  snr = 1.0 / schedules.to_device(schedule).sqrt_recipm1_alphas_cumprod ** 2
  return 1.0 / (k + snr) ** gamma


def loss_terms(schedule, model_fn: Callable, x0, i, noise, *, learn_sigma: bool = False,
               prediction: str = 'eps', p2_gamma: float = 0.0, p2_k: float = 1.0,
               rescale_vb: bool = False, loss_type: str = 'mse'):
  """Per-example loss at given step indices i [B] and noise (guided_diffusion's training_losses).

  loss = P2-weighted mean-squared (loss_type='mse') or mean absolute ('l1', as
  Diff-AE / Patch-DM train their latent DPMs) error of the prediction, plus with learn_sigma
  the variational-bound term on the variance alone (the mean part is frozen in
  it). rescale_vb multiplies that term by S/1000 (guided_diffusion's
  RESCALED_MSE, rescale_learned_sigmas=True); its default MSE loss does not.
  Returns (loss [B], dict(<loss_type>=[B], vb=[B] if learn_sigma)).
  """
  param.check_prediction(prediction)
  if loss_type not in LOSS_TYPES:
    raise UserError(f'loss_type={loss_type!r} is unknown; allowed: {", ".join(LOSS_TYPES)}.')
  sched = schedules.to_device(schedule)
  x_t = gaussian.q_sample(sched, x0, i, noise)
  output = model_fn(x_t, sched.timesteps[i])
  mean_out, var_values = param.split_output(output, x0.shape, learn_sigma)
  c = gaussian.coefs_at(sched, i, x0.ndim)
  diff = param.target(x0, noise, c, prediction) - mean_out
  err = jnp.square(diff) if loss_type == 'mse' else jnp.abs(diff)
  if p2_gamma != 0:
    err = err * gaussian.extract(p2_weight(sched, p2_gamma, p2_k), i, x0.ndim)
  aux = {loss_type: gaussian.mean_flat(err)}
  loss = aux[loss_type]
  if learn_sigma:
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_values], axis=-1)
    vb = gaussian.vb_terms_bpd(sched, frozen, x0, x_t, i, prediction=prediction,
                               learn_sigma=True)
    if rescale_vb:
      vb = vb * (schedule.num_steps / 1000.0)
    aux['vb'] = vb
    loss = loss + vb
  return loss, aux


def diffusion_loss(schedule, model_fn: Callable, x0, key, *, learn_sigma: bool = False,
                   prediction: str = 'eps', p2_gamma: float = 0.0, p2_k: float = 1.0,
                   rescale_vb: bool = False, loss_type: str = 'mse'):
  """`loss_terms` at step indices drawn uniformly with `key`, and fresh noise.

  model_fn(x_t, t) receives ORIGINAL integer timesteps. Returns
  (loss_per_example [B], aux dict of [B] arrays: mse or l1, vb (learn_sigma), t).
  """
  if x0.ndim < 2:
    raise UserError(f'x0 must be batched (at least 2-D), got shape {x0.shape}.')
  t_key, noise_key = jax.random.split(key)
  i = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_steps)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  loss, aux = loss_terms(schedule, model_fn, x0, i, noise, learn_sigma=learn_sigma,
                         prediction=prediction, p2_gamma=p2_gamma, p2_k=p2_k,
                         rescale_vb=rescale_vb, loss_type=loss_type)
  aux['t'] = schedules.to_device(schedule).timesteps[i]
  return loss, aux
