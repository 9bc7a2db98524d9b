"""Metrics to a JSONL file and TensorBoard event files, results as JSON.

Only process 0 writes. TensorBoard files come from tensorboardX, which needs no
TensorFlow.
"""

import json
import os

import jax
import numpy as np

from visgen_jax import image_io


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


def save_json(path: str, value):
  text = json.dumps(value, indent=1)

  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text)

  image_io.write_atomically(path, write)
