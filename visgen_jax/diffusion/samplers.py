"""Samplers: pure functions of (key, denoise_fn, schedule, x_T, options) -> x₀.

`denoise_fn(x_t, t, **cond)` is called with ORIGINAL timesteps t of shape [B]:
int32 on the schedule's own steps (ddpm, ddim, ddim_invert, and the ODE
solvers with grid='schedule'), float32 fractional timesteps on Karras levels
(euler, heun, dpmpp_2m by default). All steps run in one `lax.scan`, so a
sampler compiles once per jit and works under jit, vmap and with sharded
inputs (called eagerly it traces and compiles on every call: wrap it in
jax.jit to reuse the compilation). Options are checked in Python before
anything is traced, so mistakes surface as UserError, not as tracer errors.

Common options:
  cond: dict of keyword arguments for denoise_fn (arrays batched on axis 0).
  prediction: 'eps' | 'x0' | 'v'.   learn_sigma: 2C output channels (ADM).
  clip_denoised: clip x̂₀ to [-1, 1].  dynamic_threshold: percentile p (Imagen).
  cfg_weight, uncond, cfg_convention: classifier-free guidance (guidance.py).
  cond_fn(x_t, t, **cond) -> ∇ₓ log p(y | x_t): classifier guidance.
  start_step=K with x_start: SDEdit / restoration: x_T is the noise with which
    x_start is diffused to level K-1; the last K steps then run (K=0: x_start).
  progress: tqdm bar through a host callback.
  return_info: also return dict(nfe=int, trajectory=[n_ops, ...] if trajectory).
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.diffusion import editing
from visgen_jax.diffusion import gaussian
from visgen_jax.diffusion import guidance
from visgen_jax.diffusion import parameterisations as param
from visgen_jax.diffusion import schedules
from visgen_jax.errors import UserError


class _Model:
  """denoise_fn with its options; turns x_t into (x̂₀, ε̂, variance values)."""

  def __init__(self, denoise_fn, x_shape, *, cond=None, prediction='eps', learn_sigma=False,
               clip_denoised=True, dynamic_threshold=None, cfg_weight=None, uncond=None,
               cfg_convention='cfg_plus', cond_fn=None):
    param.check_prediction(prediction)
    if dynamic_threshold is not None:
      guidance.check_finite(dynamic_threshold, 'dynamic_threshold')
      if not 0 < float(dynamic_threshold) <= 1:
        raise UserError(f'dynamic_threshold={dynamic_threshold} must be a percentile in (0, 1].')
    if cond is not None and not isinstance(cond, dict):
      raise UserError(f'cond must be a dict of keyword arguments for the denoiser, got '
                      f'{type(cond).__name__}.')
    if cfg_weight is not None:
      denoise_fn = guidance.classifier_free(denoise_fn, cfg_weight, uncond,
                                            convention=cfg_convention, learn_sigma=learn_sigma)
    elif uncond is not None:
      raise UserError('uncond was given without cfg_weight; set cfg_weight to use '
                      'classifier-free guidance.')
    self.denoise_fn = denoise_fn
    self.x_shape = tuple(x_shape)
    self.cond = cond or {}
    self.prediction = prediction
    self.learn_sigma = learn_sigma
    self.clip_denoised = clip_denoised
    self.dynamic_threshold = dynamic_threshold
    self.cond_fn = cond_fn

  def t_batch(self, t):
    return jnp.broadcast_to(t, self.x_shape[:1])

  def __call__(self, x, t, c: param.Coefs):
    """(x̂₀ processed, ε̂ re-derived from it, variance values or None)."""
    out = self.denoise_fn(x, self.t_batch(t), **self.cond)
    mean_out, var_values = param.split_output(out, x.shape, self.learn_sigma)
    x0 = param.process_x0(param.to_x0(mean_out, x, c, self.prediction), self.clip_denoised,
                          self.dynamic_threshold)
    return x0, param.eps_from_x0(x, x0, c), var_values

  def score_guided(self, x, t, c: param.Coefs, x0):
    """Classifier guidance on the score (Song et al.): ε̂ ← ε̂ − √(1-ᾱ) ∇ log p(y|x)."""
    eps = param.eps_from_x0(x, x0, c)
    eps = eps - c.sqrt_one_minus_alpha_bar * self.cond_fn(x, self.t_batch(t), **self.cond)
    x0 = param.x0_from_eps(x, eps, c)
    return x0, param.eps_from_x0(x, x0, c)


def _check_x(x_T, name='x_T'):
  if not hasattr(x_T, 'shape') or len(x_T.shape) < 2:
    raise UserError(f'{name} must be a batched array (at least 2-D), got '
                    f'{getattr(x_T, "shape", type(x_T).__name__)}.')


def _check_eta(eta):
  guidance.check_finite(eta, 'eta')
  if isinstance(eta, jax.core.Tracer) or float(eta) < 0:
    raise UserError(f'eta must be a Python number >= 0, got {eta!r}.')


def _start(schedule, x_T, start_step, x_start):
  """(K, initial state at level K-1)."""
  k = editing.check_start_step(start_step, schedule.num_steps)
  if start_step is None:
    if x_start is not None:
      raise UserError('x_start was given without start_step; set start_step=K to diffuse it '
                      'to level K and reverse from there.')
    return k, x_T
  if x_start is None:
    raise UserError('start_step needs x_start, the image to diffuse and reverse.')
  if tuple(x_start.shape) != tuple(x_T.shape):
    raise UserError(f'x_start has shape {tuple(x_start.shape)} but x_T (its noise) has '
                    f'{tuple(x_T.shape)}; they must match.')
  if k == 0:
    return 0, x_start
  return k, gaussian.q_sample(schedule, x_start, k - 1, x_T)


_BARS = {}


def _tick(k, n, tag):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  k, n = int(k), int(n)
  if k == 0:
    _BARS[tag] = tqdm(total=n)
  bar = _BARS.get(tag)
  if bar is not None:
    bar.update(1)
    if k == n - 1:
      bar.close()
      del _BARS[tag]


def _scan(body, carry, xs, n, progress, tag, trajectory):
  """lax.scan over n operations; body(carry, position, x) -> (carry, state to record)."""

  def step(carry, pos_x):
    pos, x = pos_x
    if progress:
      jax.debug.callback(_tick, pos, n, tag)
    carry, state = body(carry, pos, x)
    return carry, (state if trajectory else None)

  return jax.lax.scan(step, carry, (jnp.arange(n), xs), length=n)


def _result(x, traj, nfe, return_info, trajectory):
  if not return_info:
    return x
  info = dict(nfe=nfe)
  if trajectory:
    info['trajectory'] = traj
  return x, info


def _ancestral(kind, key, denoise_fn, schedule, x_T, *, eta=0.0, variance='fixed_large',
               cond=None, prediction='eps', learn_sigma=False, clip_denoised=True,
               dynamic_threshold=None, cfg_weight=None, uncond=None, cfg_convention='cfg_plus',
               cond_fn=None, loss_guidance: Optional[guidance.LossGuidance] = None,
               inpaint: Optional[editing.Inpaint] = None, start_step=None, x_start=None,
               progress=False, return_info=False, trajectory=False):
  """DDPM / DDIM steps along a RePaint plan, with every editing option."""
  _check_x(x_T)
  if kind == 'ddpm':
    gaussian.check_variance(variance)
  else:
    _check_eta(eta)
  model = _Model(denoise_fn, x_T.shape, cond=cond, prediction=prediction,
                 learn_sigma=learn_sigma, clip_denoised=clip_denoised,
                 dynamic_threshold=dynamic_threshold, cfg_weight=cfg_weight, uncond=uncond,
                 cfg_convention=cfg_convention, cond_fn=cond_fn)
  if loss_guidance is not None:
    loss_guidance.validate()
  if inpaint is not None:
    inpaint.validate(x_T.shape)
  k, x = _start(schedule, x_T, start_step, x_start)
  if k == 0:
    return _result(x, x[None], 0, return_info, trajectory)
  steps, up = editing.plan(k, *((inpaint.jump_length, inpaint.resamples) if inpaint else (1, 1)))
  n = len(steps)
  guided = np.array([loss_guidance is not None and not u and
                     loss_guidance.guided(int(s), schedule.num_steps)
                     for s, u in zip(steps, up)])
  sched = schedules.to_device(schedule)
  var_kind = 'learned_range' if learn_sigma else variance
  noisy = kind == 'ddpm' or eta != 0
  if key is None and (noisy or inpaint is not None):
    raise UserError(f'{kind} with these options draws noise: pass a jax.random.key, not None.')

  def down_from_pred(x, i, t, c, pred, noise):
    x0, eps, var_values = pred
    if kind == 'ddpm':
      mean, _, _ = gaussian.q_posterior_mean_variance(sched, x0, x, i)
      log_var = gaussian.model_log_variance(sched, i, x.ndim, var_kind, var_values)
      if cond_fn is not None:
        mean = mean + jnp.exp(log_var) * cond_fn(x, model.t_batch(t), **model.cond)
      return gaussian.ddpm_update(mean, log_var, noise, i)
    if cond_fn is not None:
      x0, eps = model.score_guided(x, t, c, x0)
    return gaussian.ddim_update(sched, x0, eps, i, eta, noise)

  def down(x, i, step_key, guide):
    t = sched.timesteps[i]
    c = gaussian.coefs_at(sched, i, x.ndim)
    noise = jax.random.normal(step_key, x.shape, x.dtype) if noisy else None

    def plain(x):
      return down_from_pred(x, i, t, c, model(x, t, c), noise)

    def loss_guided(x):
      def x0_and_pred(x):
        pred = model(x, t, c)
        return pred[0], pred
      x0, vjp_fn, pred = jax.vjp(x0_and_pred, x, has_aux=True)
      (grad,) = vjp_fn(jax.grad(lambda z: jnp.sum(loss_guidance.loss_fn(z)))(x0))
      return down_from_pred(x, i, t, c, pred, noise) - loss_guidance.scale * grad

    if loss_guidance is None:
      x_prev = plain(x)
    else:
      x_prev = jax.lax.cond(guide, loss_guided, plain, x)
    if inpaint is not None:
      known = jnp.asarray(inpaint.known, x.dtype)
      mask = jnp.asarray(inpaint.mask, x.dtype)
      z = jax.random.normal(jax.random.fold_in(step_key, 1), x.shape, x.dtype)
      known_prev = jnp.where(i > 0, gaussian.q_sample(sched, known, jnp.maximum(i - 1, 0), z),
                             known)
      x_prev = mask * known_prev + (1 - mask) * x_prev
    return x_prev

  def renoise(x, i, step_key):
    beta = sched.betas[i]
    z = jax.random.normal(step_key, x.shape, x.dtype)
    return jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * z

  def body(x, pos, op):
    i, is_up, guide = op
    step_key = None if key is None else jax.random.fold_in(key, pos)
    if up.any():
      x = jax.lax.cond(is_up, lambda x: renoise(x, i, step_key),
                       lambda x: down(x, i, step_key, guide), x)
    else:
      x = down(x, i, step_key, guide)
    return x, x

  xs = (jnp.asarray(steps), jnp.asarray(up), jnp.asarray(guided))
  x, traj = _scan(body, x, xs, n, progress, kind, trajectory)
  return _result(x, traj, int((~up).sum()), return_info, trajectory)


def ddpm(key, denoise_fn: Callable, schedule, x_T, *, variance: str = 'fixed_large', **options):
  """Ancestral sampling (guided_diffusion's p_sample_loop) over the schedule's steps.

  variance: 'fixed_large' | 'fixed_small' (ignored with learn_sigma). Extra
  options: loss_guidance (guidance.LossGuidance), inpaint (editing.Inpaint).
  Step noise is jax.random.normal(fold_in(key, n), x.shape) for the n-th
  operation of the scan.
  """
  return _ancestral('ddpm', key, denoise_fn, schedule, x_T, variance=variance, **options)


def ddim(key, denoise_fn: Callable, schedule, x_T, *, eta: float = 0.0, **options):
  """DDIM with η (0: deterministic), as guided_diffusion's ddim_sample_loop.

  Same extra options as `ddpm` (loss guidance, RePaint inpainting).
  """
  return _ancestral('ddim', key, denoise_fn, schedule, x_T, eta=eta, **options)


def ddim_invert(denoise_fn: Callable, schedule, x0, *, num_steps: Optional[int] = None,
                cond=None, prediction='eps', learn_sigma=False, clip_denoised=True,
                dynamic_threshold=None, progress=False, return_info=False, trajectory=False):
  """Deterministic DDIM inversion, image -> noise (guided_diffusion's ddim_reverse_sample).

  Runs steps i = 0 .. num_steps-1, each taking the state to level i+1. The
  default num_steps = S runs the whole chain as DiffusionRig's
  ddim_reverse_sample_loop does (its last step lands on ᾱ = 0); num_steps =
  S-1 lands exactly on level S-1, where `ddim` starts.
  """
  _check_x(x0, 'x0')
  s = schedule.num_steps
  num_steps = s if num_steps is None else num_steps
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= s:
    raise UserError(f'num_steps={num_steps!r} must be an integer in [1, {s}].')
  model = _Model(denoise_fn, x0.shape, cond=cond, prediction=prediction,
                 learn_sigma=learn_sigma, clip_denoised=clip_denoised,
                 dynamic_threshold=dynamic_threshold)
  sched = schedules.to_device(schedule)

  def body(x, pos, i):
    del pos
    c = gaussian.coefs_at(sched, i, x.ndim)
    x0_hat, eps, _ = model(x, sched.timesteps[i], c)
    x = gaussian.ddim_reverse_update(sched, x0_hat, eps, i)
    return x, x

  x, traj = _scan(body, x0, jnp.arange(num_steps), num_steps, progress, 'ddim_invert',
                  trajectory)
  return _result(x, traj, num_steps, return_info, trajectory)


GRIDS = ('karras', 'schedule')


def _sigma_solver(kind, key, denoise_fn, schedule, x_T, *, grid='karras', steps=None, rho=7.0,
                  sigma_min=None, sigma_max=None, cond=None, prediction='eps', learn_sigma=False,
                  clip_denoised=True, dynamic_threshold=None, cfg_weight=None, uncond=None,
                  cfg_convention='cfg_plus', cond_fn=None, start_step=None, x_start=None,
                  progress=False, return_info=False, trajectory=False, **options):
  """ODE solvers on the probability-flow ODE in σ, with the VE state x/√ᾱ."""
  del key  # Deterministic; the argument keeps one signature for all samplers.
  for opt in ('loss_guidance', 'inpaint'):
    if options.pop(opt, None) is not None:
      raise UserError(f'{opt} is supported by the ddpm and ddim samplers, not {kind}.')
  if options:
    raise UserError(f'unknown {kind} options: {sorted(options)}.')
  _check_x(x_T)
  if grid not in GRIDS:
    raise UserError(f'grid={grid!r} is unknown; allowed: {", ".join(GRIDS)}.')
  model = _Model(denoise_fn, x_T.shape, cond=cond, prediction=prediction,
                 learn_sigma=learn_sigma, clip_denoised=clip_denoised,
                 dynamic_threshold=dynamic_threshold, cfg_weight=cfg_weight, uncond=uncond,
                 cfg_convention=cfg_convention, cond_fn=cond_fn)
  k, x = _start(schedule, x_T, start_step, x_start)
  if k == 0:
    return _result(x, x[None], 0, return_info, trajectory)
  table = schedules.sigmas(schedule)
  if grid == 'schedule':
    if (steps, sigma_min, sigma_max) != (None, None, None):
      raise UserError("steps, sigma_min and sigma_max apply to grid='karras'; with "
                      "grid='schedule' respace the schedule instead.")
    sig = np.append(table[k - 1::-1], 0.0)
    ts = jnp.asarray(np.append(np.asarray(schedule.timesteps)[k - 1::-1], 0), jnp.int32)
    sigma_max = float(sig[0])
  else:
    if start_step is not None and sigma_max is not None:
      raise UserError('give either start_step (which sets σ_max to that level) or sigma_max.')
    sigma_max = float(table[k - 1]) if sigma_max is None else sigma_max
    sigma_min = float(table[0]) if sigma_min is None else sigma_min
    for name, v in (('sigma_min', sigma_min), ('sigma_max', sigma_max), ('rho', rho)):
      guidance.check_finite(v, name)
    if not 0 < sigma_min <= sigma_max:
      raise UserError(f'need 0 < sigma_min <= sigma_max, got {sigma_min} and {sigma_max}.')
    sig = schedules.karras_sigmas(k if steps is None else steps, sigma_min, sigma_max, rho)
    ts = schedules.t_from_sigma(schedule, jnp.asarray(np.maximum(sig, 1e-30), jnp.float32))
  n = len(sig) - 1
  sig = jnp.asarray(sig, jnp.float32)

  def denoised(x, sigma, t):
    c = param.Coefs.from_sigma(sigma)
    x_vp = x * c.sqrt_alpha_bar
    x0, _, _ = model(x_vp, t, c)
    if cond_fn is not None:
      x0, _ = model.score_guided(x_vp, t, c, x0)
    return x0

  def euler_body(x, pos, op):
    del pos
    sigma, sigma_next, t, _ = op
    x = x + (x - denoised(x, sigma, t)) / sigma * (sigma_next - sigma)
    return x, x

  def heun_body(x, pos, op):
    del pos
    sigma, sigma_next, t, t_next = op
    d = (x - denoised(x, sigma, t)) / sigma
    x_e = x + d * (sigma_next - sigma)
    d_next = (x_e - denoised(x_e, sigma_next, t_next)) / sigma_next
    x = x + 0.5 * (d + d_next) * (sigma_next - sigma)
    return x, x

  def dpmpp_body(carry, pos, op):
    x, d_prev, h_prev = carry
    sigma, sigma_next, t, _ = op
    d = denoised(x, sigma, t)
    last = sigma_next == 0
    # λ = -log σ; the step to σ = 0 is x = D, computed apart to stay finite.
    h = jnp.log(sigma) - jnp.log(jnp.where(last, 1.0, sigma_next))
    second = (pos > 0) & ~last
    r = jnp.where(second, h_prev / h, 1.0)
    d_eff = jnp.where(second, (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev, d)
    x_next = jnp.where(last, d, (sigma_next / sigma) * x - jnp.expm1(-h) * d_eff)
    return (x_next, d, h), x_next

  x = x * float(np.sqrt(1 + sigma_max ** 2))
  if kind == 'heun':
    # Heun's correction needs σ_next > 0: the final step to σ = 0 is Euler's, x = D.
    xs = (sig[:-2], sig[1:-1], ts[:-2], ts[1:-1])
    x, traj = _scan(heun_body, x, xs, n - 1, progress, kind, trajectory)
    x = denoised(x, sig[-2], ts[-2])
    if trajectory:
      traj = jnp.concatenate([traj, x[None]])
    return _result(x, traj, 2 * n - 1, return_info, trajectory)
  xs = (sig[:-1], sig[1:], ts[:-1], ts[1:])
  if kind == 'euler':
    x, traj = _scan(euler_body, x, xs, n, progress, kind, trajectory)
  else:
    (x, _, _), traj = _scan(dpmpp_body, (x, jnp.zeros_like(x), jnp.ones(())), xs, n, progress,
                            kind, trajectory)
  return _result(x, traj, n, return_info, trajectory)


_SOLVER_DOC = """

  Options beyond the common ones: grid='karras' (default; `steps` levels from
  sigma_max to sigma_min, default the schedule's count and range, rho=7, the
  model seeing fractional original timesteps with log σ interpolated between
  the schedule's) or grid='schedule' (the schedule's own steps and integer
  timesteps). For the most accurate σ → t map pass the unrespaced schedule.
  `key` is unused: the solver is deterministic.
  """


def euler(key, denoise_fn: Callable, schedule, x_T, **options):
  return _sigma_solver('euler', key, denoise_fn, schedule, x_T, **options)


def heun(key, denoise_fn: Callable, schedule, x_T, **options):
  return _sigma_solver('heun', key, denoise_fn, schedule, x_T, **options)


def dpmpp_2m(key, denoise_fn: Callable, schedule, x_T, **options):
  return _sigma_solver('dpmpp_2m', key, denoise_fn, schedule, x_T, **options)


euler.__doc__ = ('Euler on the probability-flow ODE (EDM); one model call per step. On the '
                 'schedule grid it equals DDIM with η = 0.' + _SOLVER_DOC)
heun.__doc__ = ("Heun's second-order method (EDM): 2·steps − 1 model calls." + _SOLVER_DOC)
dpmpp_2m.__doc__ = ('DPM-Solver++(2M) (Lu et al.): multistep second order in λ = −log σ on the '
                    'data prediction, one model call per step; first order on the first step '
                    'and on the last (to σ = 0, x = x̂₀).' + _SOLVER_DOC)


SAMPLERS = dict(ddpm=ddpm, ddim=ddim, dpmpp_2m=dpmpp_2m, euler=euler, heun=heun)


def sample(name: str, key, denoise_fn: Callable, schedule, x_T, **options):
  """Dispatch to a sampler by name: 'ddpm', 'ddim', 'dpmpp_2m', 'euler' or 'heun'.

  eta is accepted by every sampler for uniform configs; only ddim uses it, and
  a non-zero eta elsewhere is a UserError.
  """
  if name not in SAMPLERS:
    raise UserError(f'sampler {name!r} is unknown; allowed: {", ".join(SAMPLERS)}.')
  if name != 'ddim' and 'eta' in options:
    eta = options.pop('eta')
    _check_eta(eta)
    if eta != 0:
      raise UserError(f'eta={eta} applies only to the ddim sampler, not {name}.')
  return SAMPLERS[name](key, denoise_fn, schedule, x_T, **options)


def from_config(config, base_schedule):
  """(schedule, options) for `sample` from config.sampler (name, steps, eta) and
  config.diffusion.learn_sigma: ddpm / ddim step on `base_schedule` respaced to
  `steps`, the σ-solvers (euler, heun, dpmpp_2m) take `steps` on a Karras grid
  of the full one."""
  name, steps = config.sampler.name, config.sampler.steps
  if name not in SAMPLERS:
    raise UserError(f'config.sampler.name={name!r} is unknown; allowed: {", ".join(SAMPLERS)}.')
  if not 0 < steps <= base_schedule.num_steps:
    raise UserError(f'config.sampler.steps={steps} must be in [1, {base_schedule.num_steps}].')
  options = dict(eta=config.sampler.eta, learn_sigma=config.diffusion.learn_sigma)
  if name in ('ddpm', 'ddim'):
    return schedules.respace(base_schedule, f'ddim{steps}' if name == 'ddim' else str(steps)), options
  return base_schedule, dict(options, steps=steps)
