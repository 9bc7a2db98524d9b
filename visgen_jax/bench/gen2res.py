"""Gen2Res benchmark: `python -m visgen_jax.bench gen2res`.

(a) The paper's K and constraining ablations (Fig. 5.7/5.8) as numbers, on the toy of
    visgen_jax/bench/gen2res_toy.py (the one tests/test_gen2res.py asserts on): PSNR and SSIM
    (on [0, 1]) of the restored test photo to the clean one, for K in KS, with
    - unconstrained: the base model;
    - generative album: the base fine-tuned on ALBUM_SIZE images it made from the degraded
      input with skip guidance (K = 200, λ = 0.3 every 10th timestep, as Gen2Res's album);
    - personal album: the base fine-tuned on the subject's album (other photos, not this one);
    both fine-tunes the same toy.ALBUM_STEPS steps, each number the mean over DRAWS restorations
    with different noise (the std beside PSNR). The trained models and the album are kept in
    $VISGEN_BENCH_DIR/gen2res_toy_models (default <tmp>/visgen_bench) and reused on reruns (delete
    it after changing the toy); the figure gen2res_k_ablation.png (rows: input, unconstrained,
    generative album, personal album; one column per K; the first draw, 4x nearest upscaling),
    the clean photo and the album grid are written beside it.
(b) Wall time of each stage of the command line's path for one image at `:tiny` (32², 4-image
    album at K = 50), run in-process on a random base model, each including its compilation:
    album, fine-tune (the variant's 20 steps, and per 100 steps: 120 steps minus 20), restore.
(c) One denoiser call of a restoration (the toy's UNet on the DRAWS draws): its FLOPs from XLA's
    cost analysis, the FLOP/s achieved, and on a GPU/TPU the MFU (bench.common.flops_report).
"""

import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax import image_io
from visgen_jax.bench import gen2res_toy as toy
from visgen_jax.bench.common import best_time, flops_report
from visgen_jax.diffusion import restoration
from visgen_jax.eval.image_quality import psnr, ssim
from visgen_jax.systems import adm, gen2res
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer, weights

KS = (50, 100, 200, 400)
DRAWS = 8
ALBUM_SIZE = 16
UPSCALE = 4


def _log(message):
  print(f'[bench gen2res] {message}', file=sys.stderr, flush=True)


def _out_dir():
  return os.environ.get('VISGEN_BENCH_DIR', os.path.join(tempfile.gettempdir(), 'visgen_bench'))


def _cached(directory, name, make, like):
  """make() (a tree like `like`), or what an earlier run saved as directory/name.npz."""
  path = os.path.join(directory, name + '.npz')
  if os.path.isfile(path):
    _log(f'{name}: reused from {path}')
    with np.load(path) as saved:
      return jax.tree_util.tree_map_with_path(lambda p, _: jnp.asarray(saved[weights.path_name(p)]), like)
  _log(f'{name}: making it')
  tree = make()
  flat = {key: np.asarray(leaf) for key, leaf in weights.flatten(tree).items()}
  image_io.write_atomically(path, lambda tmp: np.savez(tmp, **flat))
  return tree


def _models(directory):
  """The toy's base, generative-album and personal-album models, the album and the degraded input."""
  config = toy.config()
  system = gen2res.make(config)
  subject, others = toy.faces()
  degraded = toy.degrade(subject, jax.random.key(3))
  restore = toy.restorer(config)
  params = toy.init(system, others)
  base = _cached(directory, f'base_{toy.BASE_STEPS}', lambda: toy.train(
      system, config.optimizer, params, others, toy.BASE_STEPS, seed=1), params)
  finetuned = lambda album: toy.train(system, config.optimizer, base, album, toy.ALBUM_STEPS, seed=2)
  album = _cached(directory, f'generative_album_{ALBUM_SIZE}', lambda: {'album': jnp.clip(restore(
      base, jnp.broadcast_to(degraded, (ALBUM_SIZE, *degraded.shape)), jax.random.key(4),
      start_step=restoration.DEFAULT_START_STEP, guidance_scale=restoration.DEFAULT_GUIDANCE_SCALE), -1, 1)},
                  {'album': degraded[None]})['album']
  models = {
      'unconstrained': base,
      'generative_album': _cached(directory, f'generative_{toy.ALBUM_STEPS}', lambda: finetuned(album), params),
      'personal_album': _cached(directory, f'personal_{toy.ALBUM_STEPS}',
                                lambda: finetuned(toy.personal_album(subject)), params)}
  return models, album, subject, degraded, restore


def _unit(images):
  """[-1, 1] -> [0, 1] numpy."""
  return np.clip((np.asarray(images, np.float64) + 1) / 2, 0, 1)


def _scores(images, clean):
  p = [psnr(image, _unit(clean)) for image in _unit(images)]
  s = [ssim(image, _unit(clean)) for image in _unit(images)]
  return {'psnr': float(np.mean(p)), 'psnr_std': float(np.std(p)), 'ssim': float(np.mean(s))}


def _figure(rows):
  """rows of [-1, 1] images [RES, RES, 3] -> one uint8 grid, upscaled, 2 px white gaps."""
  cell = lambda image: np.pad(np.kron(image_io.to_uint8(image), np.ones((UPSCALE, UPSCALE, 1), np.uint8)),
                              ((2, 0), (2, 0), (0, 0)), constant_values=255)
  grid = np.concatenate([np.concatenate([cell(image) for image in row], axis=1) for row in rows], axis=0)
  return np.pad(grid, ((0, 2), (0, 2), (0, 0)), constant_values=255)


def ablations(directory) -> dict:
  models, album, subject, degraded, restore = _models(directory)
  draws = jnp.broadcast_to(degraded, (DRAWS, *degraded.shape))
  result = {'degraded_input': _scores(degraded[None], subject),
            'generative_album_images': _scores(album, subject)}
  rows = {name: [] for name in models}  # unconstrained, generative, personal: the figure's rows
  for k in KS:
    result[f'K={k}'] = {}
    for name, params in models.items():
      _log(f'restoring with {name} at K={k}')
      restored = restore(params, draws, jax.random.key(10), start_step=k)
      result[f'K={k}'][name] = _scores(restored, subject)
      rows[name].append(restored[0])
  figure = os.path.join(directory, 'gen2res_k_ablation.png')
  image_io.save_png(figure, _figure([[degraded] * len(KS), *rows.values()]))
  image_io.save_png(os.path.join(directory, 'clean.png'), _figure([[subject]]))
  image_io.save_png(os.path.join(directory, 'generative_album.png'), image_io.image_grid(album))
  result['input'] = os.path.join(directory, 'degraded.png')
  image_io.save_png(result['input'], image_io.to_uint8(degraded))
  result['figure'] = figure
  result['denoiser_call'] = denoiser_flops(models['unconstrained'], draws)
  return result


def denoiser_flops(params, images) -> dict:
  """flops_report of one call of the toy's UNet on `images` at the restorations' start step."""
  config = toy.config()
  unet = adm.make_unet(config.model)
  denoise = jax.jit(lambda p, x, t: unet.apply({'params': p}, x, t))
  t = jnp.full((len(images),), restoration.DEFAULT_START_STEP, jnp.int32)
  seconds = best_time(lambda: denoise(params, images, t).block_until_ready())
  return flops_report(denoise, (params, images, t), seconds, dtype=config.compute_dtype)


def _timed(fn, *args):
  start = time.perf_counter()
  fn(*args)
  return time.perf_counter() - start


def stage_seconds(directory, input_png) -> dict:
  """Each stage of --mode=gen2res at `:tiny` for one image, timed in fresh workdirs."""
  shutil.rmtree(directory, ignore_errors=True)
  base, workdir = os.path.join(directory, 'base'), os.path.join(directory, 'run')
  toy.save_random_base(config_lib.load_config(toy.CONFIG), base)
  config = lambda *extra: config_lib.load_config(toy.CONFIG, (f'init_from={base}', f'gen2res.input={input_png}',
                                                              *extra))
  _log('stages at :tiny: album')
  album = _timed(gen2res.make_album, config(), workdir)
  _log('stages at :tiny: fine-tune, 20 and 120 steps')
  short = _timed(gen2res.finetune, config(), workdir, trainer)
  album_dir = os.path.join(workdir, gen2res.ALBUM_DIR)
  long = _timed(gen2res.finetune, config('total_steps=120', f'data.path={album_dir}'),
                os.path.join(directory, 'run_120_steps'), trainer)
  _log('stages at :tiny: restore')
  restore = _timed(trainer.run_command, config(), workdir, 'restore')
  return {'album': album, 'finetune_20_steps': short, 'finetune_per_100_steps': long - short, 'restore': restore}


def run() -> dict:
  start = time.perf_counter()
  directory = os.path.join(_out_dir(), 'gen2res_toy_models')
  result = {'toy': (f'{toy.RES}x{toy.RES} ADM (:tiny, one level, no attention), base {toy.BASE_STEPS} steps on '
                    f'99 built-in faces, fine-tuned {toy.ALBUM_STEPS} steps (lr 2e-3 to 0, batch {toy.BATCH}); '
                    f'generative album {ALBUM_SIZE} images at K={restoration.DEFAULT_START_STEP}, '
                    f'lambda={restoration.DEFAULT_GUIDANCE_SCALE}; means over {DRAWS} draws'),
            **ablations(directory)}
  result['stage_seconds_tiny'] = stage_seconds(os.path.join(_out_dir(), 'gen2res_stages'), result['input'])
  result['machine'] = f'{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()})'
  result['bench_seconds'] = time.perf_counter() - start
  return result
