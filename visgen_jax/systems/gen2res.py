"""Gen2Res (restoration by generation with constrained priors) on the ADM recipe.

Commands on a workdir W (diffusion.restoration does the sampling):
  --mode=album     config.gen2res.input -> W/album/00000.png ... (album_size images made with
                   skip guidance toward it, one compiled batched call; base model: config.init_from)
                   and the grid W/album.png
  --mode=finetune  fine-tunes config.init_from on data.path (a personal album: any folder of
                   model-sized images), or on W/album when data.path is empty; W is the run
  --mode=restore   config.gen2res.input (an image or a folder) restored with W's fine-tuned model
                   -> W/restored/<name>.png (no guidance unless gen2res.restore_guidance_scale)
  --mode=gen2res   album -> finetune -> restore for one image; each stage is skipped when its
                   result is in W, so an interrupted run resumes at the stage it was in.
Outputs go to the workdir, not beside the inputs: an input folder may be read-only or shared,
and restored files written into it would be read as inputs by the next run on that folder.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from visgen_jax import image_io
from visgen_jax.data import folder, image_folder, pipeline
from visgen_jax.diffusion import restoration, schedules
from visgen_jax.errors import UserError
from visgen_jax.systems import adm
from visgen_jax.train import checkpoint, sharding, weights

ALBUM_DIR, ALBUM_GRID, RESTORED_DIR = 'album', 'album.png', 'restored'


def validate(config):
  adm.validate(config)
  g, t = config.gen2res, config.diffusion.num_timesteps
  if not config.diffusion.learn_sigma:
    raise UserError('config.diffusion.learn_sigma=False: Gen2Res samples with the model\'s learned variance; set it '
                    'to True (out_channels 6), as the released base model has it.')
  if not isinstance(g.start_step, int) or not 1 <= g.start_step <= t:
    raise UserError(f'config.gen2res.start_step={g.start_step!r} (K) must be an integer in [1, {t}] '
                    '(config.diffusion.num_timesteps).')
  for key in ('guidance_scale', 'restore_guidance_scale'):
    if not math.isfinite(g[key]) or g[key] < 0:
      raise UserError(f'config.gen2res.{key}={g[key]} must be a finite number >= 0.')
  for key in ('guidance_every', 'album_size'):
    if g[key] < 1:
      raise UserError(f'config.gen2res.{key}={g[key]} must be at least 1.')


def _schedule(config):
  return schedules.make_schedule(config.diffusion.noise_schedule, config.diffusion.num_timesteps)


def _read_input(config, path=None) -> np.ndarray:
  """An input image as float32 [H, W, 3] in [-1, 1] at the model's size (stretched, as the
  original interpolates)."""
  res = config.model.image_size
  image = image_io.read_rgb(path or config.gen2res.input, 'config.gen2res.input')
  return image_io.to_float(image_io.resize_and_crop(image, (res, res), 'none'))


def _inputs(config) -> list[tuple[str, np.ndarray]]:
  """(output name, image) of config.gen2res.input: one image, or every image of a folder."""
  path = config.gen2res.input
  if os.path.isdir(path):
    names, _ = folder.list_images(path)
    if not names:
      raise UserError(f'config.gen2res.input={path!r} is a folder without images.')
    return [(os.path.splitext(n)[0] + '.png', _read_input(config, os.path.join(path, n))) for n in names]
  return [(os.path.splitext(os.path.basename(path))[0] + '.png', _read_input(config))]


def _restorer(config, unet, guidance_scale):
  """jit (params, key, y [B, H, W, 3]) -> restored images, with a progress bar."""
  g, schedule = config.gen2res, _schedule(config)

  def run(params, key, y):
    denoise_fn = lambda x_t, t: unet.apply({'params': params}, x_t, t).astype(jnp.float32)
    return restoration.restore(key, denoise_fn, schedule, y, start_step=g.start_step,
                               guidance_scale=guidance_scale, guidance_every=g.guidance_every,
                               learn_sigma=True, progress=jax.process_index() == 0)

  return jax.jit(run)


def make(config):
  system = adm.make(config)
  unet = adm.make_unet(config.model, config.compute_dtype)

  def restore(params, key, workdir):
    """--mode=restore: each input restored on its own (one compiled call per image)."""
    inputs = _inputs(config)  # every input read before anything is written
    run = _restorer(config, unet, config.gen2res.restore_guidance_scale)
    out = os.path.join(workdir, RESTORED_DIR)
    for i, (name, y) in enumerate(inputs):
      restored = jax.device_get(run(params, jax.random.fold_in(key, i), jnp.asarray(y)[None]))
      image_io.save_png(os.path.join(out, name), image_io.to_uint8(restored[0]))
    if image_io.is_writer():
      print(f'Wrote {len(inputs)} restored images to {out}', flush=True)

  return dataclasses.replace(system, commands={**system.commands, 'restore': restore})


def _base_params(config):
  """The complete parameters config.init_from gives (the model to make an album with)."""
  if not config.init_from:
    raise UserError('config.init_from is empty; give the base model: a guided-diffusion .pt such as '
                    'base_256.pt, a converted directory or a workdir.')
  system = make(config)
  shapes = jax.eval_shape(system.init, jax.random.key(0), pipeline.example_batch(config.data, 1))
  loaded = weights.initial_weights(config.init_from, config, shapes)
  missing = sorted(set(weights.flatten(shapes)) - set(loaded))
  if missing:
    raise UserError(f'config.init_from gives {len(loaded)} parameters but not {missing[0]} and '
                    f'{len(missing) - 1} more; the album needs a complete base model.')
  return jax.tree_util.tree_map_with_path(lambda p, _: jnp.asarray(loaded[sharding.path_name(p)]), shapes)


def make_album(config, workdir):
  """--mode=album: W/album/*.png (album_size images from one input) and the grid W/album.png."""
  y = _read_input(config)
  params = _base_params(config)
  g = config.gen2res
  unet = adm.make_unet(config.model, config.compute_dtype)
  run = _restorer(config, unet, g.guidance_scale)
  batch = jnp.broadcast_to(jnp.asarray(y), (g.album_size, *y.shape))
  album = jax.device_get(run(params, jax.random.key(config.seed), batch))
  for i, image in enumerate(image_io.to_uint8(album)):
    image_io.save_png(os.path.join(workdir, ALBUM_DIR, f'{i:05d}.png'), image)
  image_io.save_png(os.path.join(workdir, ALBUM_GRID), image_io.image_grid(album))  # last: the stage's mark
  if image_io.is_writer():
    print(f'Wrote an album of {len(album)} images to {os.path.join(workdir, ALBUM_DIR)}', flush=True)


def finetune(config, workdir, core):
  """--mode=finetune: trains W from config.init_from on the album (data.path, else W/album)."""
  config = config.copy_and_resolve_references()
  if not config.data.path:
    config.data.path = os.path.join(workdir, ALBUM_DIR)
  res = config.model.image_size
  count = len(image_folder.read_folder(config.data.path, (res, res)))
  if count < config.batch_size:
    raise UserError(f'data.path={config.data.path!r} holds {count} images, fewer than config.batch_size='
                    f'{config.batch_size}; give a larger album or a smaller batch.')
  fresh = checkpoint.latest_step(os.path.join(workdir, 'checkpoints')) is None
  if fresh and not config.init_from:
    raise UserError('config.init_from is empty; Gen2Res fine-tunes a base model: give base_256.pt, a converted '
                    'directory or a workdir.')
  core.train(config, workdir)


def whole_path(config, workdir, core):
  """--mode=gen2res: album -> finetune -> restore, resuming at the unfinished stage."""
  _read_input(config)  # a bad input fails before any stage writes
  if os.path.isfile(os.path.join(workdir, ALBUM_GRID)):
    tqdm.write('album: done, in ' + os.path.join(workdir, ALBUM_DIR))
  else:
    make_album(config, workdir)
  if checkpoint.latest_step(os.path.join(workdir, 'checkpoints')) == config.total_steps:
    tqdm.write('finetune: done')
  else:
    finetune(config, workdir, core)
  core.run_command(config, workdir, 'restore')


def run_command(config, workdir, mode, core):
  """Gen2Res's stages run before W holds a checkpoint; other modes (restore, sample) on it.
  `core` is the trainer (systems.run_command)."""
  if mode == 'album':
    make_album(config, workdir)
  elif mode == 'finetune':
    finetune(config, workdir, core)
  elif mode == 'gen2res':
    whole_path(config, workdir, core)
  else:
    core.run_command(config, workdir, mode)
