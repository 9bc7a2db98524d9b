"""Schedules, parameterisations, the Gaussian core and the training loss (no torch needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visgen_jax.diffusion import gaussian
from visgen_jax.diffusion import losses
from visgen_jax.diffusion import parameterisations as param
from visgen_jax.diffusion import schedules
from visgen_jax.errors import UserError

LINEAR = schedules.make_schedule('linear', 1000)


def test_named_schedules():
  np.testing.assert_allclose(LINEAR.betas[[0, -1]], [1e-4, 0.02])
  np.testing.assert_allclose(schedules.make_schedule('linear', 250).betas[[0, -1]], [4e-4, 0.08])
  cos = schedules.make_schedule('cosine', 1000)
  assert np.all(np.diff(cos.alphas_cumprod) < 0) and cos.betas.max() <= 0.999
  # Nichol & Dhariwal: ᾱ(t) = f(t)/f(0) with f(t) = cos²((t/T + s)/(1 + s) π/2), s = 0.008.
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(cos.alphas_cumprod[499], f(0.5) / f(0), rtol=1e-9)
  const = schedules.make_schedule('const0.008', 500)
  np.testing.assert_allclose(const.betas, 0.016)
  assert const.num_steps == 500


@pytest.mark.parametrize('name,steps', [('quadratic', 1000), ('linear', 0), ('const2', 1000),
                                        ('const', 1000), ('linear', 10.5)])
def test_bad_schedule_is_a_user_error(name, steps):
  with pytest.raises(UserError):
    schedules.make_schedule(name, steps)


def test_respace_keeps_alpha_bar_and_maps_to_original_timesteps():
  r = schedules.respace(LINEAR, 'ddim50')
  np.testing.assert_array_equal(r.timesteps, np.arange(0, 1000, 20))
  np.testing.assert_allclose(r.alphas_cumprod, LINEAR.alphas_cumprod[r.timesteps], rtol=1e-12)
  twice = schedules.respace(schedules.respace(LINEAR, '100'), '10')
  assert set(twice.timesteps) <= set(schedules.respace(LINEAR, '100').timesteps)
  np.testing.assert_allclose(twice.alphas_cumprod, LINEAR.alphas_cumprod[twice.timesteps],
                             rtol=1e-12)
  np.testing.assert_array_equal(schedules.respace(LINEAR, '10,10,10').timesteps[:3], [0, 37, 74])


@pytest.mark.parametrize('spacing', ['2000', 'ddim1001', 'ddim999', '400,400,400', 'abc', '',
                                     '0', 'ddimx'])
def test_bad_spacing_is_a_user_error(spacing):
  with pytest.raises(UserError):
    schedules.respace(LINEAR, spacing)


def test_sigma_and_timestep_maps_are_inverse():
  sig = schedules.sigmas(LINEAR)
  t = jnp.array([0.0, 10.0, 10.5, 500.25, 999.0])
  back = schedules.t_from_sigma(LINEAR, schedules.sigma_from_t(LINEAR, t))
  np.testing.assert_allclose(back, t, atol=2e-3)
  np.testing.assert_allclose(schedules.sigma_from_t(LINEAR, jnp.array([0, 999])), sig[[0, -1]],
                             rtol=1e-5)
  respaced = schedules.respace(LINEAR, '20')
  np.testing.assert_allclose(schedules.t_from_sigma(respaced, schedules.sigmas(respaced)),
                             respaced.timesteps, atol=2e-3)
  k = schedules.karras_sigmas(10, 0.01, 80.0)
  assert k.shape == (11,) and k[-1] == 0
  np.testing.assert_allclose(k[[0, -2]], [80.0, 0.01], rtol=1e-6)
  assert np.all(np.diff(k) < 0)


def test_parameterisation_conversions_round_trip():
  rng = np.random.default_rng(0)
  x0, eps = rng.standard_normal((2, 4, 3)).astype(np.float32)
  c = gaussian.coefs_at(LINEAR, 600, 2)
  x_t = c.sqrt_alpha_bar * x0 + c.sqrt_one_minus_alpha_bar * eps
  v = param.v_from_x0_eps(x0, eps, c)
  for prediction, out in (('eps', eps), ('x0', x0), ('v', v)):
    np.testing.assert_allclose(param.to_x0(out, x_t, c, prediction), x0, atol=1e-5)
    np.testing.assert_allclose(param.target(x0, eps, c, prediction), out, atol=1e-6)
  np.testing.assert_allclose(param.eps_from_x0(x_t, x0, c), eps, atol=1e-5)
  s = param.Coefs.from_sigma(jnp.float32(schedules.sigmas(LINEAR)[600]))
  for a, b in zip(s, c):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_static_clip_and_dynamic_threshold():
  x0 = jnp.array([[0.5, -3.0, 2.0, 0.1], [0.2, -0.3, 0.4, 0.9]])
  np.testing.assert_allclose(param.process_x0(x0), jnp.clip(x0, -1, 1))
  np.testing.assert_array_equal(param.process_x0(x0, clip_denoised=False), x0)
  out = param.process_x0(x0, dynamic_threshold=1.0)
  np.testing.assert_allclose(out[0], x0[0] / 3.0, rtol=1e-6)  # s = max |x̂₀| = 3.
  np.testing.assert_allclose(out[1], x0[1])  # s = max(1, 0.9) = 1: untouched.
  assert float(jnp.abs(param.process_x0(x0, dynamic_threshold=0.5)).max()) <= 1.0


def test_model_output_shape_is_checked():
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(UserError, match='6 channels'):
    gaussian.p_mean_variance(LINEAR, jnp.zeros((2, 4, 4, 3)), x, jnp.array([1, 2]),
                             learn_sigma=True)
  with pytest.raises(UserError, match='prediction'):
    param.check_prediction('score')


def test_learned_range_spans_fixed_small_to_fixed_large():
  x = jnp.zeros((3, 2, 2, 1))
  i = jnp.array([5, 5, 5])
  var_values = jnp.array([-1.0, 1.0, 0.0])[:, None, None, None] * jnp.ones_like(x)
  out = gaussian.p_mean_variance(LINEAR, jnp.concatenate([x, var_values], -1), x, i,
                                 learn_sigma=True)
  lv = out['log_variance'][:, 0, 0, 0]
  np.testing.assert_allclose(lv[0], LINEAR.posterior_log_variance_clipped[5], rtol=1e-6)
  np.testing.assert_allclose(lv[1], np.log(LINEAR.betas[5]), rtol=1e-6)
  np.testing.assert_allclose(lv[2], (lv[0] + lv[1]) / 2, rtol=1e-6)


def test_loss_is_zero_for_a_perfect_model_and_jits():
  x0 = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
  noise = jnp.asarray(np.random.default_rng(2).standard_normal(x0.shape), jnp.float32)
  i = jnp.array([0, 10, 500, 999])
  c = gaussian.coefs_at(LINEAR, i, x0.ndim)

  @jax.jit
  def perfect_losses():
    return [losses.loss_terms(LINEAR, lambda x_t, t, p=p: param.target(x0, noise, c, p), x0, i,
                              noise, prediction=p) for p in ('eps', 'x0', 'v')]

  for loss, aux in perfect_losses():
    np.testing.assert_allclose(loss, 0, atol=1e-6)
    assert set(aux) == {'mse'}
  model = lambda x_t, t: 0.9 * x_t + 0.001 * t[:, None, None, None]
  run = jax.jit(lambda key: losses.diffusion_loss(LINEAR, model, x0, key))
  loss, aux = run(jax.random.key(0, impl='rbg'))
  assert loss.shape == (4,) and aux['t'].shape == (4,) and aux['t'].dtype == jnp.int32
  assert np.all(np.asarray(loss) > 0)


def test_p2_weighting():
  x0 = jnp.ones((3, 2, 2, 1)) * 0.5
  noise = jnp.ones_like(x0)
  i = jnp.array([10, 500, 990])
  model = lambda x_t, t: jnp.zeros_like(x_t)
  plain, _ = losses.loss_terms(LINEAR, model, x0, i, noise)
  same, _ = losses.loss_terms(LINEAR, model, x0, i, noise, p2_gamma=0.0, p2_k=5.0)
  np.testing.assert_array_equal(plain, same)
  weighted, _ = losses.loss_terms(LINEAR, model, x0, i, noise, p2_gamma=1.0, p2_k=1.0)
  snr = LINEAR.alphas_cumprod[i] / (1 - LINEAR.alphas_cumprod[i])
  np.testing.assert_allclose(weighted, plain / (1 + snr), rtol=1e-4)
  # Low-SNR (noisy) steps keep their weight, high-SNR ones are down-weighted.
  w = np.asarray(losses.p2_weight(LINEAR, 1.0, 1.0))
  assert np.all(np.diff(w) > 0) and w[-1] > 0.99


def test_l1_loss_is_the_mean_absolute_error_and_an_unknown_type_is_refused():
  x0 = jnp.zeros((2, 3))
  noise = jnp.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
  model = lambda x_t, t: jnp.zeros_like(x_t)  # predicts ε = 0: the error is the noise itself
  i = jnp.array([3, 700])
  l1, aux = losses.loss_terms(LINEAR, model, x0, i, noise, loss_type='l1')
  np.testing.assert_allclose(l1, [3.5 / 3, 4.0 / 3], rtol=1e-6)
  assert set(aux) == {'l1'}
  mse, _ = losses.loss_terms(LINEAR, model, x0, i, noise)
  np.testing.assert_allclose(mse, [5.25 / 3, 10.0 / 3], rtol=1e-6)
  with pytest.raises(UserError, match='loss_type'):
    losses.loss_terms(LINEAR, model, x0, i, noise, loss_type='huber')


def test_hybrid_loss_trains_variance_only_through_vb():
  x0 = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  noise = jnp.asarray(np.random.default_rng(4).standard_normal(x0.shape), jnp.float32)
  i = jnp.array([0, 300])

  def parts(mean_scale, var_value):
    def model(x_t, t):
      return jnp.concatenate([mean_scale * x_t, jnp.full_like(x_t, var_value)], -1)
    return losses.loss_terms(LINEAR, model, x0, i, noise, learn_sigma=True)[1]

  @jax.jit
  def grads():
    return (jax.grad(lambda m: jnp.sum(parts(m, 0.1)['vb']))(0.5),
            jax.grad(lambda v: jnp.sum(parts(0.5, v)['vb']))(0.1),
            jax.grad(lambda v: jnp.sum(parts(0.5, v)['mse']))(0.1))

  g_mean, g_var, g_mse_var = grads()
  assert float(g_mean) == 0.0 and float(g_var) != 0.0 and float(g_mse_var) == 0.0


def test_q_sample_marginal_statistics():
  x0 = jnp.full((20000, 1), 0.8)
  noise = jax.random.normal(jax.random.key(5), x0.shape)
  x_t = gaussian.q_sample(LINEAR, x0, 400, noise)
  ab = LINEAR.alphas_cumprod[400]
  np.testing.assert_allclose(float(x_t.mean()), np.sqrt(ab) * 0.8, atol=0.02)
  np.testing.assert_allclose(float(x_t.var()), 1 - ab, rtol=0.05)
