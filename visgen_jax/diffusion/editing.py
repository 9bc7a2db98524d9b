"""Editing: RePaint inpainting / outpainting and the SDEdit-style start, and the
edit commands (--mode=inpaint|outpaint|sdedit) any system gets from its sampler.

The samplers run a static plan of operations in one `lax.scan`: a `down` step
i takes the state from noise level i to i-1 with the model (level -1 is clean
data); an `up` step i re-noises it from level i-1 to i with q(x_i | x_{i-1}).
"""

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from visgen_jax import image_io
from visgen_jax.errors import UserError

# The samplers that keep a known region (the `inpaint` option).
KNOWN_REGION_SAMPLERS = ('ddpm', 'ddim')


@dataclasses.dataclass(frozen=True)
class Inpaint:
  """Known-region replacement after every down step (RePaint, Lugmayr et al.).

  known: image [B, ...] like x; mask: 1 where `known` is kept, broadcastable
  to x (e.g. [B, H, W, 1] or [H, W, 1]). After the step to level i-1 the known
  region is replaced by q_sample(known, i-1), and by `known` itself at the
  end, so the result equals `known` there. RePaint's resampling: after every
  `jump_length` down steps, go back up `jump_length` steps, `resamples - 1`
  times per jump point (jump_length=1, resamples=1: plain replacement).
  """
  known: Any
  mask: Any
  jump_length: int = 1
  resamples: int = 1

  def validate(self, x_shape) -> None:
    known_shape = tuple(np.shape(self.known))
    if known_shape != tuple(x_shape):
      raise UserError(f'Inpaint.known has shape {known_shape}; it must equal the sample shape '
                      f'{tuple(x_shape)}.')
    mask_shape = tuple(np.shape(self.mask))
    try:
      out = np.broadcast_shapes(mask_shape, tuple(x_shape))
    except ValueError:
      out = None
    if out != tuple(x_shape):
      raise UserError(f'Inpaint.mask has shape {mask_shape}, which does not broadcast to the '
                      f'sample shape {tuple(x_shape)}; use e.g. [B, H, W, 1] with 1 = known.')
    for name in ('jump_length', 'resamples'):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise UserError(f'Inpaint.{name} must be an integer >= 1, got {v!r}.')


def check_start_step(start_step: Optional[int], num_steps: int) -> int:
  """The level K the reverse process starts from: K steps of S remain (None: all)."""
  if start_step is None:
    return num_steps
  if not isinstance(start_step, (int, np.integer)) or not 0 <= start_step <= num_steps:
    raise UserError(f'start_step={start_step!r} must be an integer in [0, {num_steps}] (the '
                    'number of reverse steps of the schedule to run).')
  return int(start_step)


def plan(start: int, jump_length: int = 1, resamples: int = 1):
  """(step index, is_up) pairs from level start-1 down to clean data.

  Jump points are the levels 0, L, 2L, ... below start-1-L; on reaching one
  (after a down step), the plan climbs L levels again, resamples-1 times.
  """
  remaining = {j: resamples - 1 for j in range(0, start - jump_length, jump_length)}
  ops, level = [], start - 1
  while level >= 0:
    ops.append((level, False))
    level -= 1
    if remaining.get(level, 0) > 0:
      remaining[level] -= 1
      for _ in range(jump_length):
        level += 1
        ops.append((level, True))
  steps = np.array([s for s, _ in ops], np.int32).reshape(-1)
  up = np.array([u for _, u in ops], bool).reshape(-1)
  return steps, up


def edit_config() -> ml_collections.ConfigDict:
  """config.edit, read by the commands of `commands`."""
  return ml_collections.ConfigDict(dict(
      input='',  # the image to edit (any file image_io reads)
      mask='',  # inpaint: canvas-sized, white (lighter than mid-grey) = fill in, black = keep
      strength=0.5,  # sdedit: the fraction of the sampling steps run from the noised input, in (0, 1]
      jump_length=1, resamples=1))  # RePaint's resampling in inpaint / outpaint (1, 1: plain replacement)


def commands(config, run_sampler: Callable, num_steps: int, canvas_hw, canvas_key: str) -> dict:
  """--mode=inpaint|outpaint|sdedit for a system: name -> fn(params, key, workdir).

  run_sampler(params, key, x_T, **options) -> images [N, H, W, 3] in [-1, 1] is
  the system's denoiser and sampler with sampler `options` added (`inpaint`, or
  `start_step` + `x_start`); num_steps: the levels of the schedule it samples
  on; canvas_hw: (H, W) of its images, set by the config key `canvas_key`.
  Each command reads config.edit.*, draws config.sample.num images from x_T
  (drawn from its own split of `key`) and writes them as
  WORKDIR/<command>/00000.png, ... + grid.png, atomically, from process 0;
  every input is checked before anything is written.
    inpaint:  edit.input (canvas-sized) is kept where edit.mask (canvas-sized)
              is black and filled in where it is white;
    outpaint: edit.input (smaller than the canvas) is kept at the canvas's
              centre, the rest filled in;
    sdedit:   edit.input, resized to cover the canvas and centre-cropped, is
              noised to level round(edit.strength · num_steps) (at least 1) and
              denoised from there (SDEdit, Meng et al.).
  inpaint and outpaint replace the known region after every step (`Inpaint`,
  edit.jump_length / edit.resamples), which the ddpm and ddim samplers do.
  """
  hw = tuple(canvas_hw)
  edit = config.edit

  def generate(params, key, workdir, name, options, *arrays):
    """Samples with options(x_T's shape, *arrays) added; the arrays are arguments
    of the compiled program, not constants baked into it."""
    noise_key, key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, (config.sample.num, *hw, 3))
    run = jax.jit(lambda p, k, x, *a: run_sampler(p, k, x, **options(x.shape, *a)))
    images = jax.device_get(run(params, key, x_T, *arrays))
    out = os.path.join(workdir, name)
    image_io.save_pngs(out, images)
    if image_io.is_writer():
      print(f'Wrote {len(images)} images to {out}', flush=True)

  def keep_known(params, key, workdir, name, known, mask):
    """Samples with `known` [H, W, 3] kept where `mask` [H, W, 1] is 1."""
    def options(shape, known, mask):
      return dict(inpaint=Inpaint(jnp.broadcast_to(known, shape), mask[None], edit.jump_length, edit.resamples))
    generate(params, key, workdir, name, options, known, mask)

  def check_known_region_settings():
    name = config.sampler.name
    if name not in KNOWN_REGION_SAMPLERS:
      raise UserError(f'config.sampler.name={name!r} cannot keep a known region; inpaint and outpaint '
                      f'need one of {", ".join(KNOWN_REGION_SAMPLERS)}.')
    for setting in ('jump_length', 'resamples'):
      if edit[setting] < 1:
        raise UserError(f'config.edit.{setting}={edit[setting]} must be at least 1 (1 and 1: plain '
                        'replacement).')

  def inpaint(params, key, workdir):
    check_known_region_settings()
    image = image_io.to_float(image_io.read_rgb(edit.input, 'config.edit.input'))
    holes = image_io.to_float(image_io.read_rgb(edit.mask, 'config.edit.mask'))
    if image.shape[:2] != hw or holes.shape[:2] != hw:
      raise UserError(f'config.edit.input ({image.shape[0]}x{image.shape[1]}) and config.edit.mask '
                      f'({holes.shape[0]}x{holes.shape[1]}) must both be the canvas size {canvas_key}='
                      f'{hw[0]}x{hw[1]}.')
    mask = (holes.mean(axis=-1, keepdims=True) < 0).astype(np.float32)  # white (> mid-grey) = fill in
    if mask.all():
      raise UserError(f'config.edit.mask={edit.mask!r} has no white pixels: nothing to inpaint.')
    if not mask.any():
      raise UserError(f'config.edit.mask={edit.mask!r} is white everywhere, so the mask covers '
                      'everything; mark only the regions to fill in white.')
    keep_known(params, key, workdir, 'inpaint', image, mask)

  def outpaint(params, key, workdir):
    check_known_region_settings()
    image = image_io.to_float(image_io.read_rgb(edit.input, 'config.edit.input'))
    h, w = image.shape[:2]
    if h > hw[0] or w > hw[1]:
      raise UserError(f'config.edit.input is {h}x{w}, larger than the canvas {canvas_key}={hw[0]}x{hw[1]}; '
                      'outpainting needs an image smaller than the canvas.')
    if (h, w) == hw:
      raise UserError(f'config.edit.input fills the whole {h}x{w} canvas ({canvas_key}), so the outpainting '
                      'mask covers everything; give an image smaller than the canvas.')
    top, left = (hw[0] - h) // 2, (hw[1] - w) // 2
    known = np.zeros((*hw, 3), np.float32)
    known[top:top + h, left:left + w] = image
    mask = np.zeros((*hw, 1), np.float32)
    mask[top:top + h, left:left + w] = 1
    keep_known(params, key, workdir, 'outpaint', known, mask)

  def sdedit(params, key, workdir):
    strength = edit.strength
    if not 0 < strength <= 1:
      raise UserError(f'config.edit.strength={strength} must be in (0, 1]: the fraction of the {num_steps} '
                      'sampling steps to run from the noised input.')
    image = image_io.read_rgb(edit.input, 'config.edit.input')
    start = image_io.to_float(image_io.resize_and_crop(image, hw, 'center'))
    start_step = max(1, round(strength * num_steps))
    options = lambda shape, start: dict(start_step=start_step, x_start=jnp.broadcast_to(start, shape))
    generate(params, key, workdir, 'sdedit', options, start)

  return {'inpaint': inpaint, 'outpaint': outpaint, 'sdedit': sdedit}
