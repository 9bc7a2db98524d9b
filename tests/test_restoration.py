"""diffusion.restoration.restore (Gen2Res) against a hand-written loop of its formula on a small UNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from visgen_jax.diffusion import restoration
from visgen_jax.diffusion import schedules
from visgen_jax.errors import UserError
from visgen_jax.models.adm_unet import ADMUNet

T = 50
SCHEDULE = schedules.make_schedule('linear', T)
UNET = ADMUNet(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
               attention_resolutions=(), channel_mult=(1,), use_scale_shift_norm=True)


@pytest.fixture(scope='module')
def denoise_fn():
  shapes = jax.eval_shape(UNET.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32))
  params = helpers.random_params(shapes['params'])
  return jax.jit(lambda x, t: UNET.apply({'params': params}, x, t))


def _y(batch=2):
  return jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, 8, 8, 3)), jnp.float32)


def _by_hand(key, denoise_fn, y, k, scale, every):
  """Gen2Res's p_sample_loop written out: ancestral steps with the learned variance, skip guidance
  on the timesteps t with (t + 1) % every == 0."""
  ab = np.asarray(SCHEDULE.alphas_cumprod)
  ab_prev = np.append(1.0, ab[:-1])
  betas = np.asarray(SCHEDULE.betas)
  post_var = betas * (1 - ab_prev) / (1 - ab)
  post_log_var = np.log(np.append(post_var[1], post_var[1:]))
  noise_key, step_key = jax.random.split(key)
  x = np.sqrt(ab[k - 1]) * y + np.sqrt(1 - ab[k - 1]) * jax.random.normal(noise_key, y.shape)

  def x0_of(x, t):
    out = denoise_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    eps, v = out[..., :3], out[..., 3:]
    return jnp.clip((x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t]), -1, 1), v

  for n, t in enumerate(range(k - 1, -1, -1)):
    x0, v = x0_of(x, t)
    mean = (np.sqrt(ab_prev[t]) * betas[t] / (1 - ab[t]) * x0 +
            np.sqrt(1 - betas[t]) * (1 - ab_prev[t]) / (1 - ab[t]) * x)
    frac = (v + 1) / 2
    log_var = frac * np.log(betas[t]) + (1 - frac) * post_log_var[t]
    noise = jax.random.normal(jax.random.fold_in(step_key, n), x.shape)
    x_prev = mean + (t > 0) * jnp.exp(0.5 * log_var) * noise
    if (t + 1) % every == 0:
      loss = lambda x, t: jnp.sum(jnp.sqrt(jnp.sum((y - x0_of(x, t)[0]) ** 2, axis=(1, 2, 3))))
      x_prev = x_prev - scale * jax.jit(jax.grad(loss), static_argnums=1)(x, t)
    x = x_prev
  return np.asarray(x)


def test_skip_guidance_is_the_formula(denoise_fn):
  key, y = jax.random.key(3), _y()
  # K = 12, n = 5: guided at t = 9 and 4 (counting by step position would guide t = 7 and 2).
  got = restoration.restore(key, denoise_fn, SCHEDULE, y, start_step=12, guidance_scale=0.3,
                            guidance_every=5)
  want = _by_hand(key, denoise_fn, y, 12, 0.3, 5)
  unguided = _by_hand(key, denoise_fn, y, 12, 0.0, 5)
  np.testing.assert_allclose(got, want, atol=2e-4)
  assert np.abs(unguided - want).max() > 100 * 2e-4  # guidance changes the result


def test_plain_restore_is_the_formula_without_guidance(denoise_fn):
  key, y = jax.random.key(4), _y()
  got = restoration.restore(key, denoise_fn, SCHEDULE, y, start_step=15)
  np.testing.assert_allclose(got, _by_hand(key, denoise_fn, y, 15, 0.0, 10 ** 6), atol=2e-4)


def test_no_steps_returns_the_input(denoise_fn):
  y = _y()
  np.testing.assert_array_equal(restoration.restore(jax.random.key(0), denoise_fn, SCHEDULE, y, start_step=0,
                                                    guidance_scale=0.3), y)


@pytest.mark.parametrize('kwargs, message', [
    (dict(guidance_scale=float('nan')), 'guidance scale must be finite'),
    (dict(start_step=T + 1), 'start_step=51 must be an integer in'),
])
def test_bad_options(denoise_fn, kwargs, message):
  with pytest.raises(UserError, match=message):
    restoration.restore(jax.random.key(0), denoise_fn, SCHEDULE, _y(), **{'start_step': 5, **kwargs})


def test_respaced_schedule_is_refused(denoise_fn):
  with pytest.raises(UserError, match='full schedule'):
    restoration.restore(jax.random.key(0), denoise_fn, schedules.respace(SCHEDULE, '10'), _y(), start_step=5)
