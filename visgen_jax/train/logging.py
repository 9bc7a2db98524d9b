"""Metrics to a JSONL file and TensorBoard event files, and image grids as PNG.

Only process 0 writes. TensorBoard files come from tensorboardX, which needs no
TensorFlow.
"""

import json
import math
import os
import tempfile

import jax
import numpy as np
from PIL import Image


class MetricWriter:

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    import tensorboardX  # heavy import, only where it is used
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict):
    if not self._active:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def write_images(self, step: int, tag: str, grid: np.ndarray):
    if self._active:
      self._tb.add_image(tag, grid, step, dataformats='HWC')

  def close(self):
    if self._active:
      self._jsonl.close()
      self._tb.close()


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8, rounding as guided_diffusion's sample script does."""
  return np.asarray(np.clip((np.asarray(images, np.float32) + 1) * 127.5, 0, 255).round(), np.uint8)


def image_grid(images) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 [rows*H, cols*W, 3] grid, 2 px gaps."""
  images = to_uint8(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + 2) - 2, cols * (w + 2) - 2, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * (h + 2):r * (h + 2) + h, q * (w + 2):q * (w + 2) + w] = img
  return grid


def umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_atomically(path: str, write):
  """write(tmp_path) then rename onto path: a reader never sees half a file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=os.path.splitext(path)[1])
  os.close(handle)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; give it a plain file's mode
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def save_png(path: str, image: np.ndarray):
  write_atomically(path, lambda tmp: Image.fromarray(image).save(tmp, format='PNG'))


def save_json(path: str, value):
  text = json.dumps(value, indent=1)

  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text)

  write_atomically(path, write)
