"""Parity with OpenAI's guided_diffusion (GaussianDiffusion / SpacedDiffusion) on a tiny model.

The model is a fixed random per-pixel linear map with a t-dependent bias,
written identically in torch (NCHW) and jax (NHWC). Noise is shared by
replacing torch.randn_like with a feed of the jax sampler's own step noise.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('guided_diffusion')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from guided_diffusion import respace as gd_respace  # pylint: disable=g-import-not-at-top
from guided_diffusion import script_util  # pylint: disable=g-import-not-at-top

from visgen_jax.diffusion import gaussian  # pylint: disable=g-import-not-at-top
from visgen_jax.diffusion import guidance
from visgen_jax.diffusion import losses
from visgen_jax.diffusion import samplers
from visgen_jax.diffusion import schedules

B, H, W, C = 2, 4, 4, 3
TOL = 1e-4


def _weights(learn_sigma, seed=0):
  rng = np.random.default_rng(seed)
  c_out = 2 * C if learn_sigma else C
  w = (0.6 * np.eye(C, c_out) + 0.2 * rng.standard_normal((C, c_out))).astype(np.float32)
  b = (0.3 * rng.standard_normal(c_out)).astype(np.float32)
  return w, b


def _jax_model(learn_sigma):
  w, b = map(jnp.asarray, _weights(learn_sigma))

  def fn(x, t):
    out = x @ w + b * jnp.cos(0.013 * t.astype(jnp.float32))[:, None, None, None]
    if learn_sigma:
      out = jnp.concatenate([out[..., :C], jnp.tanh(out[..., C:])], axis=-1)
    return out

  return fn


def _torch_model(learn_sigma):
  w, b = map(torch.from_numpy, _weights(learn_sigma))

  def fn(x, t, **unused):
    del unused
    out = torch.einsum('bchw,cd->bdhw', x, w)
    out = out + b[None, :, None, None] * torch.cos(0.013 * t.float())[:, None, None, None]
    if learn_sigma:
      out = torch.cat([out[:, :C], torch.tanh(out[:, C:])], dim=1)
    return out

  return fn


def _jax_cond_fn(x, t):
  return -0.2 * (x - 0.1) * (1 + 0.001 * t.astype(jnp.float32))[:, None, None, None]


def _torch_cond_fn(x, t, **unused):
  del unused
  return -0.2 * (x - 0.1) * (1 + 0.001 * t.float())[:, None, None, None]


def _diffusion(noise_schedule='linear', respacing='', learn_sigma=False, sigma_small=False,
               steps=1000, predict_xstart=False, rescale_learned_sigmas=False):
  return script_util.create_gaussian_diffusion(
      steps=steps, learn_sigma=learn_sigma, sigma_small=sigma_small,
      noise_schedule=noise_schedule, timestep_respacing=respacing,
      predict_xstart=predict_xstart, rescale_learned_sigmas=rescale_learned_sigmas)


def _schedule(noise_schedule='linear', respacing='', steps=1000):
  s = schedules.make_schedule(noise_schedule, steps)
  return schedules.respace(s, respacing) if respacing else s


def _nchw(a):
  return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _feed_noise(monkeypatch, key, n_ops):
  """torch.randn_like returns the noise the jax sampler draws at operation n."""
  feed = [_nchw(jax.random.normal(jax.random.fold_in(key, n), (B, H, W, C)))
          for n in range(n_ops)]

  def randn_like(x):
    return feed.pop(0).to(x.dtype)

  monkeypatch.setattr(torch, 'randn_like', randn_like)
  return feed


@pytest.mark.parametrize('name,respacing', [('linear', ''), ('cosine', ''), ('linear', 'ddim50'),
                                            ('cosine', '10,15,20'), ('linear', '250')])
def test_schedule_tables_match(name, respacing):
  ref = _diffusion(name, respacing)
  s = _schedule(name, respacing)
  np.testing.assert_array_equal(s.timesteps, ref.timestep_map)
  for field in ('betas', 'alphas_cumprod', 'alphas_cumprod_prev', 'alphas_cumprod_next',
                'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod',
                'posterior_variance', 'posterior_log_variance_clipped',
                'posterior_mean_coef1', 'posterior_mean_coef2'):
    np.testing.assert_allclose(getattr(s, field), getattr(ref, field), rtol=1e-12, err_msg=field)


@pytest.mark.parametrize('spacing', ['ddim25', 'ddim100', '250', '10,10,10', '7,3', '1000'])
def test_space_timesteps_match(spacing):
  assert schedules.space_timesteps(1000, spacing) == sorted(
      gd_respace.space_timesteps(1000, spacing))


@pytest.mark.parametrize('learn_sigma,sigma_small,respacing,predict_xstart', [
    (False, False, '', False), (False, True, '', False), (True, False, 'ddim50', False),
    (False, False, '30', True)])
def test_q_sample_posterior_and_p_mean_variance(learn_sigma, sigma_small, respacing,
                                                predict_xstart):
  ref = _diffusion('cosine', respacing, learn_sigma, sigma_small, predict_xstart=predict_xstart)
  s = _schedule('cosine', respacing)
  rng = np.random.default_rng(1)
  x0 = rng.uniform(-1, 1, (B, H, W, C)).astype(np.float32)
  noise = rng.standard_normal((B, H, W, C)).astype(np.float32)
  i = np.array([0, s.num_steps - 1 - 3])
  x_t = gaussian.q_sample(s, jnp.asarray(x0), jnp.asarray(i), jnp.asarray(noise))
  ref_x_t = ref.q_sample(_nchw(x0), torch.from_numpy(i), _nchw(noise))
  np.testing.assert_allclose(x_t, _nhwc(ref_x_t), atol=1e-6)

  mean, var, log_var = gaussian.q_posterior_mean_variance(s, jnp.asarray(x0), x_t, jnp.asarray(i))
  r_mean, r_var, r_log_var = ref.q_posterior_mean_variance(_nchw(x0), ref_x_t, torch.from_numpy(i))
  np.testing.assert_allclose(mean, _nhwc(r_mean), atol=1e-6)
  np.testing.assert_allclose(jnp.broadcast_to(var, x_t.shape), _nhwc(r_var), rtol=1e-6)
  np.testing.assert_allclose(jnp.broadcast_to(log_var, x_t.shape), _nhwc(r_log_var), rtol=1e-6)

  jfn = _jax_model(learn_sigma)
  out = gaussian.p_mean_variance(
      s, jfn(x_t, s.timesteps[i]), x_t, jnp.asarray(i),
      prediction='x0' if predict_xstart else 'eps', learn_sigma=learn_sigma,
      variance='fixed_small' if sigma_small else 'fixed_large')
  r_out = ref.p_mean_variance(_torch_model(learn_sigma), ref_x_t, torch.from_numpy(i))
  for k in ('mean', 'variance', 'log_variance', 'pred_xstart'):
    np.testing.assert_allclose(out[k], _nhwc(r_out[k]), rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize('name,respacing,learn_sigma,sigma_small', [
    ('linear', '', False, False), ('cosine', '50', True, False),
    ('linear', '10,10,10', False, True)])
def test_ddpm_loop_matches_p_sample_loop(monkeypatch, name, respacing, learn_sigma, sigma_small):
  ref = _diffusion(name, respacing, learn_sigma, sigma_small)
  s = _schedule(name, respacing)
  key = jax.random.key(3)
  x_T = jax.random.normal(jax.random.key(4), (B, H, W, C))
  out = samplers.ddpm(key, _jax_model(learn_sigma), s, x_T, learn_sigma=learn_sigma,
                      variance='fixed_small' if sigma_small else 'fixed_large')
  feed = _feed_noise(monkeypatch, key, s.num_steps)
  r = ref.p_sample_loop(_torch_model(learn_sigma), (B, C, H, W), noise=_nchw(x_T), device='cpu')
  assert not feed
  np.testing.assert_allclose(out, _nhwc(r), atol=TOL)


@pytest.mark.parametrize('name,respacing,learn_sigma,eta', [
    ('linear', 'ddim25', False, 0.0), ('cosine', '30', True, 0.5), ('linear', '', False, 0.0)])
def test_ddim_loop_matches_ddim_sample_loop(monkeypatch, name, respacing, learn_sigma, eta):
  ref = _diffusion(name, respacing, learn_sigma)
  s = _schedule(name, respacing)
  key = jax.random.key(5)
  x_T = jax.random.normal(jax.random.key(6), (B, H, W, C))
  out = samplers.ddim(key, _jax_model(learn_sigma), s, x_T, eta=eta, learn_sigma=learn_sigma)
  _feed_noise(monkeypatch, key, s.num_steps)
  r = ref.ddim_sample_loop(_torch_model(learn_sigma), (B, C, H, W), noise=_nchw(x_T),
                           device='cpu', eta=eta)
  np.testing.assert_allclose(out, _nhwc(r), atol=TOL)


@pytest.mark.parametrize('kind', ['ddpm', 'ddim'])
def test_classifier_guidance_matches(monkeypatch, kind):
  ref = _diffusion('linear', '40')
  s = _schedule('linear', '40')
  key = jax.random.key(7)
  x_T = jax.random.normal(jax.random.key(8), (B, H, W, C))
  out = samplers.sample(kind, key, _jax_model(False), s, x_T, cond_fn=_jax_cond_fn,
                        eta=0.3 if kind == 'ddim' else 0.0)
  _feed_noise(monkeypatch, key, s.num_steps)
  loop = ref.p_sample_loop if kind == 'ddpm' else ref.ddim_sample_loop
  extra = dict(eta=0.3) if kind == 'ddim' else {}
  r = loop(_torch_model(False), (B, C, H, W), noise=_nchw(x_T), device='cpu',
           cond_fn=_torch_cond_fn, model_kwargs={}, **extra)
  np.testing.assert_allclose(out, _nhwc(r), atol=TOL)


def test_ddim_inversion_matches_ddim_reverse_sample():
  ref = _diffusion('linear', 'ddim20')
  s = _schedule('linear', 'ddim20')
  x0 = jax.random.uniform(jax.random.key(9), (B, H, W, C), minval=-1, maxval=1)
  out = samplers.ddim_invert(_jax_model(False), s, x0)
  x = _nchw(x0)
  for i in range(s.num_steps):
    x = ref.ddim_reverse_sample(_torch_model(False), x, torch.full((B,), i))['sample']
  np.testing.assert_allclose(out, _nhwc(x), atol=TOL)


def test_sdedit_start_matches_skip_timesteps(monkeypatch):
  """start_step=K equals guided_diffusion's init_image with skip_timesteps = S - K."""
  ref = _diffusion('linear', '50')
  s = _schedule('linear', '50')
  key = jax.random.key(10)
  noise = jax.random.normal(jax.random.key(11), (B, H, W, C))
  image = jax.random.uniform(jax.random.key(12), (B, H, W, C), minval=-1, maxval=1)
  out = samplers.ddpm(key, _jax_model(False), s, noise, start_step=20, x_start=image)
  _feed_noise(monkeypatch, key, 20)
  r = ref.p_sample_loop(_torch_model(False), (B, C, H, W), noise=_nchw(noise), device='cpu',
                        skip_timesteps=30, init_image=_nchw(image))
  np.testing.assert_allclose(out, _nhwc(r), atol=TOL)


def test_loss_guidance_matches_gen2res_style_loop(monkeypatch):
  """Skip guidance (n=10, λ=0.3, ‖y₀ − x̂₀‖₂) against the same loop over guided_diffusion."""
  ref = _diffusion('linear', '40')
  s = _schedule('linear', '40')
  key = jax.random.key(13)
  x_T = jax.random.normal(jax.random.key(14), (B, H, W, C))
  y0 = jax.random.uniform(jax.random.key(15), (B, H, W, C), minval=-1, maxval=1)
  lg = guidance.LossGuidance(guidance.l2_to(y0), scale=0.3, every=10, top_steps=3)
  out = samplers.ddpm(key, _jax_model(False), s, x_T, loss_guidance=lg)

  _feed_noise(monkeypatch, key, s.num_steps)
  model, ref_y0 = _torch_model(False), _nchw(y0)
  x = _nchw(x_T)
  for idx in range(s.num_steps - 1, -1, -1):
    t = torch.full((B,), idx)
    if (idx + 1) % 10 == 0 or idx >= s.num_steps - 3:
      x = x.detach().requires_grad_()
      o = ref.p_sample(model, x, t)
      norm = torch.linalg.norm((ref_y0 - o['pred_xstart']).flatten(1), dim=1).sum()
      grad = torch.autograd.grad(norm, x)[0]
      x = o['sample'].detach() - 0.3 * grad
    else:
      with torch.no_grad():
        x = ref.p_sample(model, x, t)['sample']
  np.testing.assert_allclose(out, _nhwc(x), atol=TOL)


@pytest.mark.parametrize('learn_sigma,predict_xstart,rescale,steps', [
    (False, False, False, 1000), (True, False, False, 1000), (True, False, True, 500),
    (False, True, False, 1000)])
def test_loss_terms_match_training_losses(learn_sigma, predict_xstart, rescale, steps):
  ref = _diffusion('linear', '', learn_sigma, steps=steps, predict_xstart=predict_xstart,
                   rescale_learned_sigmas=rescale)
  s = _schedule('linear', steps=steps)
  rng = np.random.default_rng(2)
  x0 = rng.uniform(-1, 1, (4, H, W, C)).astype(np.float32)
  noise = rng.standard_normal((4, H, W, C)).astype(np.float32)
  i = np.array([0, 1, steps // 2, steps - 1])
  jfn = _jax_model(learn_sigma)
  loss, aux = losses.loss_terms(s, lambda x, t: jnp.concatenate([jfn(x[:2], t[:2]),
                                                                  jfn(x[2:], t[2:])]),
                                jnp.asarray(x0), jnp.asarray(i), jnp.asarray(noise),
                                learn_sigma=learn_sigma,
                                prediction='x0' if predict_xstart else 'eps', rescale_vb=rescale)
  tfn = _torch_model(learn_sigma)
  r = ref.training_losses(lambda x, t: torch.cat([tfn(x[:2], t[:2]), tfn(x[2:], t[2:])]),
                          _nchw(x0), torch.from_numpy(i), noise=_nchw(noise))
  np.testing.assert_allclose(loss, r['loss'].numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux['mse'], r['mse'].numpy(), rtol=1e-5, atol=1e-6)
  if learn_sigma:
    np.testing.assert_allclose(aux['vb'], r['vb'].numpy(), rtol=1e-5, atol=1e-6)


def test_p2_weight_matches_diffusion_rig_formula():
  ref = _diffusion('linear', '')
  s = _schedule('linear')
  snr = 1.0 / (1 - ref.alphas_cumprod) - 1  # float64, as DiffusionRig precomputes it.
  for gamma, k in ((1.0, 1.0), (0.5, 1.0), (0.0, 1.0)):
    want = 1 / (k + snr) ** gamma
    np.testing.assert_allclose(losses.p2_weight(s, gamma, k), want, rtol=1e-5)
