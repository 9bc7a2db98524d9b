"""Samplers against a 2-D Gaussian mixture with an exact denoiser; guidance, editing, errors."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from visgen_jax.diffusion import editing
from visgen_jax.diffusion import gmm
from visgen_jax.diffusion import guidance
from visgen_jax.diffusion import parameterisations as param
from visgen_jax.diffusion import samplers
from visgen_jax.diffusion import schedules
from visgen_jax.errors import UserError

BASE = schedules.make_schedule('linear', 1000)


def _key(seed):
  # RBG keys: the samplers take any key type, and threefry costs ~1 s of compile per use on CPU.
  return jax.random.key(seed, impl='rbg')


MIX = gmm.default_mixture()
N = 600


@functools.lru_cache(maxsize=None)
def _x_T():
  return jax.random.normal(_key(0), (N, 2))


@functools.lru_cache(maxsize=None)
def _run(name, steps, prediction='eps', n=N):
  """(samples, info) of name with `steps` steps from _x_T()[:n]: respaced schedule for
  ddpm/ddim, Karras levels on the whole schedule for the σ-solvers."""
  fn = MIX.denoise_fn(BASE, prediction)
  kw = dict(clip_denoised=False, prediction=prediction, return_info=True)
  if name in ('ddpm', 'ddim'):
    sched = schedules.respace(BASE, str(steps))
  else:
    sched, kw = BASE, dict(kw, steps=steps)
  return samplers.sample(name, _key(1), fn, sched, _x_T()[:n], **kw)


@pytest.fixture(scope='module')
def data():
  return MIX.sample(_key(2), N)


def _rms(a, b):
  return float(jnp.sqrt(jnp.mean(jnp.sum((a - b) ** 2, -1))))


@pytest.mark.parametrize('name,few,many', [('ddpm', 10, 250), ('ddim', 5, 100),
                                           ('dpmpp_2m', 5, 100), ('euler', 5, 100),
                                           ('heun', 5, 50)])
def test_distribution_approaches_the_mixture(name, few, many, data):
  floor = float(gmm.mmd(MIX.sample(_key(3), N), data))
  coarse = float(gmm.mmd(_run(name, few)[0], data))
  fine = float(gmm.mmd(_run(name, many)[0], data))
  assert fine < 0.2 * coarse
  assert fine < 3 * floor + 0.005


def test_second_order_solvers_beat_ddim_at_equal_nfe():
  """Error against the probability-flow ODE solved finely (Heun, 399 model calls)."""
  reference = _run('heun', 200)[0]
  ddim20, info = _run('ddim', 20)
  dpm20, info_dpm = _run('dpmpp_2m', 20)
  assert info['nfe'] == info_dpm['nfe'] == 20
  assert _rms(dpm20, reference) < 0.8 * _rms(ddim20, reference)
  heun, info_heun = _run('heun', 50)
  ddim99, info = _run('ddim', 99)
  assert info['nfe'] == info_heun['nfe'] == 99
  assert _rms(heun, reference) < 0.5 * _rms(ddim99, reference)


def test_euler_on_the_schedule_grid_is_ddim():
  sched = schedules.respace(BASE, '15')
  fn = MIX.denoise_fn(BASE)
  a = samplers.ddim(None, fn, sched, _x_T(), clip_denoised=False)
  b = samplers.euler(None, fn, sched, _x_T(), grid='schedule', clip_denoised=False)
  np.testing.assert_allclose(a, b, atol=2e-5)


def test_eps_x0_and_v_prediction_give_the_same_samples():
  outs = [_run('ddim', 10, p, 200)[0] for p in ('eps', 'x0', 'v')]
  np.testing.assert_allclose(outs[1], outs[0], atol=2e-4)
  np.testing.assert_allclose(outs[2], outs[0], atol=2e-4)


def _image_denoiser(x, t):
  """Exact ε̂ for pixels ~ N(0, 0.5²), plus a spatial-mean term (vanishing at both ends of
  the chain) so that image regions interact."""
  c = param.Coefs.from_sigma(schedules.sigma_from_t(BASE, t))
  ab = c.alpha_bar[:, None, None, None]
  s1m = c.sqrt_one_minus_alpha_bar[:, None, None, None]
  mix = 0.2 * c.sqrt_alpha_bar[:, None, None, None] * jnp.mean(x, axis=(1, 2), keepdims=True)
  return s1m * (x / (ab * 0.25 + 1 - ab) + mix)


IMG = (2, 8, 8, 3)
SCHED = schedules.respace(BASE, '25')


def test_ddim_inversion_round_trip():
  """Inversion evaluates ε̂ one level off, so the round trip is exact only as steps grow."""
  x0 = 0.5 * jax.random.uniform(_key(4), IMG, minval=-1, maxval=1)
  errors = []
  for steps in ('25', '200'):
    sched = schedules.respace(BASE, steps)
    latent = samplers.ddim_invert(_image_denoiser, sched, x0, num_steps=sched.num_steps - 1)
    back = samplers.ddim(None, _image_denoiser, sched, latent)
    errors.append(float(jnp.abs(back - x0).mean()))
    assert float(jnp.std(latent)) > 1.5 * float(jnp.std(x0))
  assert errors[1] < 0.2 * errors[0]
  assert errors[1] < 0.01


@pytest.mark.parametrize('kind,jump,resamples', [('ddpm', 1, 1), ('ddpm', 5, 3), ('ddim', 3, 2)])
def test_inpainting_keeps_the_known_region(kind, jump, resamples):
  known = jax.random.uniform(_key(5), IMG, minval=-1, maxval=1)
  mask = jnp.zeros(IMG[:3] + (1,)).at[:, :, :4].set(1.0)
  x_T = jax.random.normal(_key(6), IMG)
  out, info = samplers.sample(kind, _key(7), _image_denoiser, SCHED, x_T,
                              inpaint=editing.Inpaint(known, mask, jump, resamples),
                              return_info=True, eta=0.5 if kind == 'ddim' else 0.0)
  np.testing.assert_array_equal(out[:, :, :4], known[:, :, :4])
  assert float(jnp.abs(out[:, :, 4:] - known[:, :, 4:]).mean()) > 0.1
  n_jumps = len(range(0, SCHED.num_steps - jump, jump))
  assert info['nfe'] == SCHED.num_steps + n_jumps * (resamples - 1) * jump
  if jump == 1:
    free = samplers.sample(kind, _key(7), _image_denoiser, SCHED, x_T)
    assert not np.allclose(out[:, :, 4:], free[:, :, 4:], atol=1e-3)


def test_repaint_plan_moves_one_level_at_a_time():
  steps, up = editing.plan(12, jump_length=3, resamples=3)
  level = 11
  for s, u in zip(steps, up):
    if u:
      assert s == level + 1
      level += 1
    else:
      assert s == level
      level -= 1
  assert level == -1
  assert up.sum() == len(range(0, 12 - 3, 3)) * 2 * 3


@pytest.mark.parametrize('name', list(samplers.SAMPLERS))
def test_sdedit_from_zero_steps_returns_the_input(name):
  image = jax.random.uniform(_key(8), IMG, minval=-1, maxval=1)
  noise = jax.random.normal(_key(9), IMG)
  out = samplers.sample(name, _key(10), _image_denoiser, SCHED, noise, start_step=0,
                        x_start=image)
  np.testing.assert_array_equal(out, image)


def test_sdedit_full_start_equals_sampling_from_the_diffused_input():
  image = jax.random.uniform(_key(8), IMG, minval=-1, maxval=1)
  noise = jax.random.normal(_key(9), IMG)
  k = SCHED.num_steps
  out = samplers.ddim(None, _image_denoiser, SCHED, noise, start_step=k, x_start=image)
  a = SCHED.sqrt_alphas_cumprod[-1]
  b = SCHED.sqrt_one_minus_alphas_cumprod[-1]
  ref = samplers.ddim(None, _image_denoiser, SCHED, a * image + b * noise)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_jit_vmap_and_sharded_inputs():
  run = jax.jit(lambda key, x: samplers.ddim(key, _image_denoiser, SCHED, x, eta=0.5))
  xs = jax.random.normal(_key(14), (3,) + IMG)
  one = run(_key(13), xs[1])
  np.testing.assert_allclose(jax.vmap(run, in_axes=(None, 0))(_key(13), xs)[1], one, atol=1e-5)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  spec = jax.sharding.PartitionSpec('data' if IMG[0] % len(jax.devices()) == 0 else None)
  sharded = jax.device_put(xs[1], jax.sharding.NamedSharding(mesh, spec))
  np.testing.assert_allclose(run(_key(13), sharded), one, atol=1e-5)


def test_trajectory_nfe_and_progress(capsys):
  x = jax.random.normal(_key(15), IMG)
  out, info = samplers.heun(None, _image_denoiser, SCHED, x, steps=6, return_info=True,
                            trajectory=True, progress=True)
  assert info['nfe'] == 11
  assert info['trajectory'].shape == (6,) + IMG
  np.testing.assert_array_equal(info['trajectory'][-1], out)
  capsys.readouterr()


def _cond_denoiser(calls):
  def fn(x, t, code, pos):
    calls.append((code.shape, pos.shape))
    return 0.5 * x + code[:, None, None, :] + pos
  return fn


def test_classifier_free_guidance_conventions_and_separate_drops():
  x = jax.random.normal(_key(16), IMG)
  cond = dict(code=jnp.full((2, 3), 0.3), pos=jnp.full(IMG, 0.1))
  fn = _cond_denoiser([])
  t = jnp.array([5, 5])
  eps_c = fn(x, t, **cond)
  eps_u = fn(x, t, code=jnp.zeros((2, 3)), pos=jnp.zeros(IMG))
  plus = guidance.classifier_free(fn, 2.0, dict(code=0.0, pos=0.0))(x, t, **cond)
  np.testing.assert_allclose(plus, 3 * eps_c - 2 * eps_u, atol=1e-6)
  interp = guidance.classifier_free(fn, 3.0, dict(code=0.0, pos=0.0),
                                    convention='interp')(x, t, **cond)
  np.testing.assert_allclose(interp, plus, atol=1e-6)
  only_code = guidance.classifier_free(fn, 1.0, dict(code=0.0))(x, t, **cond)
  eps_code_dropped = fn(x, t, code=jnp.zeros((2, 3)), pos=cond['pos'])
  np.testing.assert_allclose(only_code, 2 * eps_c - eps_code_dropped, atol=1e-6)
  calls = []
  samplers.ddim(None, _cond_denoiser(calls), SCHED, x, cond=cond, cfg_weight=1.5,
                uncond=dict(pos=0.0))
  assert calls == [((4, 3), (4,) + IMG[1:])]  # traced once, on a doubled batch.


def test_cfg_with_learned_sigma_mixes_only_the_mean_channels():
  fn = lambda x, t, y: jnp.concatenate([x * y[:, None, None, None], x + y[:, None, None, None]],
                                       -1)
  x = jnp.ones(IMG)
  out = guidance.classifier_free(fn, 1.0, dict(y=0.0), learn_sigma=True)(
      x, jnp.zeros(2, jnp.int32), y=jnp.array([2.0, 2.0]))
  np.testing.assert_allclose(out[..., :3], 2 * 2.0 - 0.0)
  np.testing.assert_allclose(out[..., 3:], 3.0)


def test_classifier_gradient_and_guidance_pull_towards_the_label():
  target = jnp.full(IMG, 0.7)
  cond_fn = guidance.classifier_gradient(lambda x, t: -jnp.sum((x - target) ** 2, (1, 2, 3)),
                                         scale=2.0)
  x = jnp.zeros(IMG)
  np.testing.assert_allclose(cond_fn(x, jnp.zeros(2)), 2.0 * 2 * 0.7, rtol=1e-6)
  noise = jax.random.normal(_key(17), IMG)
  plain = samplers.dpmpp_2m(None, _image_denoiser, SCHED, noise)
  guided = samplers.dpmpp_2m(None, _image_denoiser, SCHED, noise, cond_fn=cond_fn)
  assert float(jnp.abs(guided - target).mean()) < float(jnp.abs(plain - target).mean())


def test_loss_guidance_pulls_x0_towards_the_reference():
  ref = jnp.full(IMG, -0.6)
  noise = jax.random.normal(_key(18), IMG)
  plain = samplers.ddim(None, _image_denoiser, SCHED, noise)
  guided = samplers.ddim(None, _image_denoiser, SCHED, noise, loss_guidance=guidance.LossGuidance(
      guidance.l2_to(ref), scale=0.3, every=1))
  assert float(jnp.abs(guided - ref).mean()) < 0.95 * float(jnp.abs(plain - ref).mean())


def _never_called(*args, **kwargs):
  raise AssertionError('the denoiser must not be traced for invalid options')


@pytest.mark.parametrize('call', [
    lambda x: samplers.sample('ddim', None, _never_called, schedules.respace(BASE, '2000'), x),
    lambda x: samplers.sample('heun', None, _never_called, BASE, x, steps=0),
    lambda x: samplers.sample('ddpm', _key(0), _never_called, SCHED, x,
                              start_step=SCHED.num_steps + 1, x_start=x),
    lambda x: samplers.sample('euler', None, _never_called, SCHED, x, start_step=-1, x_start=x),
    lambda x: samplers.sample('ddpm', _key(0), _never_called, SCHED, x,
                              inpaint=editing.Inpaint(x, jnp.ones((2, 5, 5, 1)))),
    lambda x: samplers.sample('ddim', None, _never_called, SCHED, x, cfg_weight=float('nan'),
                              uncond=dict(y=0)),
    lambda x: samplers.sample('ddim', None, _never_called, SCHED, x, eta=float('nan')),
    lambda x: samplers.sample('ddim', None, _never_called, SCHED, x, loss_guidance=(
        guidance.LossGuidance(lambda z: z, scale=float('inf')))),
    lambda x: samplers.sample('euler', None, _never_called, SCHED, x, eta=0.5),
    lambda x: samplers.sample('plms', None, _never_called, SCHED, x),
    lambda x: samplers.sample('ddim', None, _never_called, SCHED, x, prediction='score'),
    lambda x: samplers.sample('dpmpp_2m', None, _never_called, SCHED, x,
                              inpaint=editing.Inpaint(x, jnp.ones_like(x))),
    lambda x: samplers.sample('ddpm', None, _never_called, SCHED, x),
])
def test_bad_input_is_a_user_error_before_tracing(call):
  with pytest.raises(UserError):
    call(jnp.zeros(IMG))


def test_schedule_can_be_a_jit_argument_of_the_schedule_steppers():
  x = jnp.ones(IMG)
  run = lambda name: jax.jit(lambda s, x: samplers.sample(name, None, _image_denoiser, s, x))
  np.testing.assert_allclose(run('ddim')(SCHED, x),
                             samplers.ddim(None, _image_denoiser, SCHED, x), atol=1e-5)
  with pytest.raises(UserError, match='close over the schedule'):
    run('euler')(SCHED, x)


def test_unused_editing_options_may_be_none_for_the_ode_solvers():
  x = jnp.zeros(IMG)
  out = samplers.euler(None, _image_denoiser, SCHED, x, steps=2, inpaint=None, loss_guidance=None)
  assert out.shape == IMG
  with pytest.raises(UserError, match='unknown euler options'):
    samplers.euler(None, _image_denoiser, SCHED, x, variance='fixed_small')


def test_from_config_respaces_for_ddpm_and_ddim_and_gives_the_solvers_a_step_count():
  def config(name, steps, learn_sigma=True):
    return ml_collections.ConfigDict(dict(sampler=dict(name=name, steps=steps, eta=0.0),
                                          diffusion=dict(learn_sigma=learn_sigma)))

  base = schedules.make_schedule('linear', 1000)
  schedule, options = samplers.from_config(config('ddim', 50), base)
  assert schedule.num_steps == 50 and options == dict(eta=0.0, learn_sigma=True)
  assert samplers.from_config(config('ddpm', 250), base)[0].num_steps == 250
  schedule, options = samplers.from_config(config('heun', 18, learn_sigma=False), base)
  assert schedule is base and options == dict(eta=0.0, learn_sigma=False, steps=18)
  with pytest.raises(UserError, match=r"config.sampler.name='plms' is unknown"):
    samplers.from_config(config('plms', 50), base)
  with pytest.raises(UserError, match=r'config.sampler.steps=1001 must be in \[1, 1000\]'):
    samplers.from_config(config('ddim', 1001), base)
