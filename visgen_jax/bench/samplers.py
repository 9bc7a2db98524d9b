"""Sampler benchmark: `python -m visgen_jax.bench samplers`.

(a) overhead: wall time of a jitted 50-step run / (model calls × one jitted
    denoiser call) on the same batch, per sampler (goal ≤ 1.05);
(b) error vs number of model calls (NFE) on a 2-D Gaussian mixture with an
    exact denoiser, per sampler: MMD² to the true distribution, and for the
    deterministic solvers the RMS distance to the finely solved
    probability-flow ODE; plotted to a PNG (written with PIL);
(c) DDIM-50 images/s of this library vs guided_diffusion's ddim_sample_loop
    on the same small ADM UNet (weights converted), when torch and
    guided_diffusion are installed.
The PNG goes to $VISGEN_BENCH_DIR (default: <tmp>/visgen_bench).
"""

import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from visgen_jax import image_io
from visgen_jax.diffusion import gmm
from visgen_jax.diffusion import samplers
from visgen_jax.diffusion import schedules
from visgen_jax.bench.common import best_time, flops_report
from visgen_jax.models.adm_unet import ADMUNet

NAMES = ('ddpm', 'ddim', 'dpmpp_2m', 'euler', 'heun')
UNET = dict(image_size=32, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
            attention_resolutions=(16,), channel_mult=(1, 2), num_head_channels=32)
BATCH = 4


def _unet_and_params():
  unet = ADMUNet(**UNET)
  x = jnp.zeros((BATCH, 32, 32, 3))
  params = unet.init(jax.random.key(0), x, jnp.zeros((BATCH,), jnp.int32))['params']
  # Perturb every parameter: ADM zero-initialises its output convs, which would make ε̂ = 0.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  return unet, params


def overhead(unet, params):
  """(a) per sampler: wall / (NFE × one denoiser call), both the best of several runs."""
  denoise = jax.jit(lambda p, x, t: unet.apply({'params': p}, x, t))
  x = jax.random.normal(jax.random.key(2), (BATCH, 32, 32, 3))
  t = jnp.full((BATCH,), 500, jnp.int32)
  call = best_time(lambda: denoise(params, x, t).block_until_ready(), 20)
  base = schedules.make_schedule('linear', 1000)
  out = dict(denoiser_call_s=call, denoiser_call_flops=flops_report(denoise, (params, x, t), call))
  for name in NAMES:
    sched = schedules.respace(base, '50') if name in ('ddpm', 'ddim') else base
    opts = {} if name in ('ddpm', 'ddim') else dict(steps=50)
    nfe = samplers.sample(name, jax.random.key(3), lambda x, t: x, sched, x, return_info=True,
                          **opts)[1]['nfe']
    run = jax.jit(lambda p, key, x, name=name, sched=sched, opts=opts: samplers.sample(
        name, key, lambda x_t, t: unet.apply({'params': p}, x_t, t), sched, x, **opts))
    wall = best_time(lambda: run(params, jax.random.key(4), x).block_until_ready(), 3)
    out[name] = dict(steps=50, nfe=nfe, wall_s=wall, overhead=wall / (nfe * call))
  return out


def error_vs_nfe(n=2000):
  """(b) {sampler: [(nfe, mmd, ode_rms or None)]} on the default mixture."""
  mix = gmm.default_mixture()
  base = schedules.make_schedule('linear', 1000)
  fn = mix.denoise_fn(base)
  x_T = jax.random.normal(jax.random.key(5), (n, 2))
  data = mix.sample(jax.random.key(6), n)
  floor = float(gmm.mmd(mix.sample(jax.random.key(7), n), data))
  reference = samplers.heun(None, fn, base, x_T, steps=400, clip_denoised=False)
  steps = dict(ddpm=(10, 20, 50, 100, 250, 1000), heun=(3, 5, 10, 25, 50, 100))
  curves = {}
  for name in NAMES:
    rows = []
    for s in steps.get(name, (5, 10, 20, 50, 100, 200)):
      sched = schedules.respace(base, str(s)) if name in ('ddpm', 'ddim') else base
      opts = {} if name in ('ddpm', 'ddim') else dict(steps=s)
      out, info = samplers.sample(name, jax.random.key(8), fn, sched, x_T, clip_denoised=False,
                                  return_info=True, **opts)
      ode = None if name == 'ddpm' else float(jnp.sqrt(jnp.mean(jnp.sum((out - reference) ** 2,
                                                                         -1))))
      rows.append((info['nfe'], float(gmm.mmd(out, data)), ode))
    curves[name] = rows
  return curves, floor


COLORS = dict(ddpm=(214, 39, 40), ddim=(31, 119, 180), dpmpp_2m=(44, 160, 44),
              euler=(255, 127, 14), heun=(148, 103, 189))


def plot(curves, floor, path):
  """Log-log MMD² vs NFE, one line per sampler, drawn with PIL."""
  w, h, left, right, top, bottom = 900, 600, 90, 170, 40, 70
  img = Image.new('RGB', (w, h), 'white')
  d = ImageDraw.Draw(img)
  pts = [(nfe, e) for rows in curves.values() for nfe, e, _ in rows] + [(1, floor)]
  x_lo, x_hi = 0, math.ceil(math.log10(max(p[0] for p in pts)))
  y_lo = math.floor(math.log10(min(p[1] for p in pts)))
  y_hi = math.ceil(math.log10(max(p[1] for p in pts)))

  def xy(nfe, e):
    fx = (math.log10(nfe) - x_lo) / (x_hi - x_lo)
    fy = (math.log10(max(e, 10 ** y_lo)) - y_lo) / (y_hi - y_lo)
    return left + fx * (w - left - right), h - bottom - fy * (h - top - bottom)

  for k in range(x_lo, x_hi + 1):
    x, _ = xy(10 ** k, 10 ** y_lo)
    d.line([(x, top), (x, h - bottom)], fill=(225, 225, 225))
    d.text((x - 12, h - bottom + 8), f'1e{k}', fill='black')
  for k in range(y_lo, y_hi + 1):
    _, y = xy(1, 10 ** k)
    d.line([(left, y), (w - right, y)], fill=(225, 225, 225))
    d.text((left - 45, y - 6), f'1e{k}', fill='black')
  d.rectangle([left, top, w - right, h - bottom], outline='black')
  _, y_floor = xy(1, floor)
  d.line([(left, y_floor), (w - right, y_floor)], fill=(120, 120, 120), width=1)
  d.text((w - right + 8, y_floor - 6), 'sampling floor', fill=(120, 120, 120))
  for idx, (name, rows) in enumerate(curves.items()):
    line = [xy(nfe, e) for nfe, e, _ in rows]
    d.line(line, fill=COLORS[name], width=2)
    for x, y in line:
      d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[name])
    ly = top + 20 + 20 * idx
    d.line([(w - right + 10, ly), (w - right + 35, ly)], fill=COLORS[name], width=3)
    d.text((w - right + 42, ly - 6), name, fill='black')
  d.text((left, 12), 'Gaussian mixture: MMD^2 to the true distribution vs model calls (NFE)',
         fill='black')
  d.text(((w - right + left) // 2 - 30, h - 30), 'NFE (log)', fill='black')
  d.text((10, top - 25), 'MMD^2 (log)', fill='black')
  image_io.save_png(path, np.asarray(img))


def ddim50_images_per_s(unet):
  """(c) DDIM-50 images/s here vs guided_diffusion's ddim_sample_loop, same weights.

  None when torch or guided_diffusion is missing.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from guided_diffusion import script_util  # pylint: disable=g-import-not-at-top
    from guided_diffusion import unet as gd_unet  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  from visgen_jax.convert import guided_diffusion as convert  # pylint: disable=g-import-not-at-top
  args = dict(UNET, attention_resolutions=tuple(32 // r for r in UNET['attention_resolutions']))
  torch.manual_seed(0)
  ref_model = gd_unet.UNetModel(**args).eval()
  with torch.no_grad():
    for p in ref_model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  params = convert.convert_unet_state_dict(
      {k: v.numpy() for k, v in ref_model.state_dict().items()}, unet)
  diffusion = script_util.create_gaussian_diffusion(steps=1000, timestep_respacing='ddim50')
  sched = schedules.respace(schedules.make_schedule('linear', 1000), 'ddim50')
  x_T = jax.random.normal(jax.random.key(9), (BATCH, 32, 32, 3))
  run = jax.jit(lambda p, x: samplers.ddim(
      None, lambda x_t, t: unet.apply({'params': p}, x_t, t), sched, x))
  ours = best_time(lambda: run(params, x_T).block_until_ready(), 3)
  noise = torch.from_numpy(np.asarray(x_T).transpose(0, 3, 1, 2).copy())
  result = {}

  def theirs_run():
    with torch.no_grad():
      result['x'] = diffusion.ddim_sample_loop(ref_model, (BATCH, 3, 32, 32), noise=noise,
                                               device='cpu')

  # Torch's own thread pool can be far slower than one thread on a busy machine: keep the best.
  theirs, threads = math.inf, 1
  for n in sorted({1, os.cpu_count() or 1}):
    torch.set_num_threads(n)
    wall = best_time(theirs_run, 1)
    if wall < theirs:
      theirs, threads = wall, n
  diff = float(np.abs(np.asarray(run(params, x_T)) -
                      result['x'].numpy().transpose(0, 2, 3, 1)).max())
  return dict(batch=BATCH, image_size=32, ours_images_per_s=BATCH / ours,
              guided_diffusion_images_per_s=BATCH / theirs, torch_threads=threads,
              speedup=theirs / ours,
              max_abs_diff_of_samples=diff)


def run() -> dict:
  unet, params = _unet_and_params()
  result = dict(devices=[str(d) for d in jax.devices()], overhead=overhead(unet, params))
  curves, floor = error_vs_nfe()
  out_dir = os.environ.get('VISGEN_BENCH_DIR', os.path.join(tempfile.gettempdir(), 'visgen_bench'))
  os.makedirs(out_dir, exist_ok=True)
  png = os.path.join(out_dir, 'samplers_error_vs_nfe.png')
  plot(curves, floor, png)
  result['error_vs_nfe'] = dict(
      mmd_floor=floor, plot=png,
      curves={k: [dict(nfe=a, mmd=b, ode_rms=c) for a, b, c in v] for k, v in curves.items()})
  result['ddim50'] = ddim50_images_per_s(unet)
  return result
