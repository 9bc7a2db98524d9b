"""FID feature extraction benchmark: `python -m visgen_jax.bench fid`.

Images/s of the FID Inception on uint8 256² images (resized to 299² inside, as for an FFHQ-256
evaluation): the Flax model through the project's FeatureExtractor (all outputs: pool3, logits,
spatial) and pytorch-fid's InceptionV3 (pool3, as its fid_score computes), on this CPU, the same
random weights, batch and thread count, measured side by side in one run. Both sides include
turning uint8 into [0, 1] floats. pytorch-fid is fed as its fid_score feeds it (contiguous NCHW
batches of ToTensor images, 'pytorch_fid', which 'ratio' compares with); PyTorch's channels-last
layout, which pytorch-fid does not use, is measured too ('pytorch_fid_channels_last').
"""

import os

import jax
import numpy as np

from visgen_jax.bench import oracles
from visgen_jax.bench.common import best_time, flops_report
from visgen_jax.convert.inception import convert_inception_state_dict
from visgen_jax.fid.features import FeatureExtractor

BATCH = 16
SIZE = 256


def run() -> dict:
  import torch
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  model, state_dict = oracles.fid_inception_torch(seed=0)
  extractor = FeatureExtractor(convert_inception_state_dict(
      {k: v.numpy() for k, v in state_dict.items()}), BATCH)
  images = np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
  outputs = {}

  def ours():
    outputs['flax'] = extractor([images], BATCH, 'bench')['pool']

  def theirs(memory_format):
    with torch.no_grad():
      batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
      batch = batch.contiguous(memory_format=memory_format)
      outputs['torch'] = model(batch)[0][:, :, 0, 0].numpy()

  flax_rate = BATCH / best_time(ours)
  torch_rate = BATCH / best_time(lambda: theirs(torch.contiguous_format))
  model.to(memory_format=torch.channels_last)
  channels_last_rate = BATCH / best_time(lambda: theirs(torch.channels_last))
  return {
      'machine': f'{threads} CPU cores, jax {jax.__version__} ({jax.default_backend()}, '
                 f'{jax.local_device_count()} devices), torch {torch.__version__} '
                 f'({torch.get_num_threads()} threads)',
      'model': f'FID InceptionV3, uint8 {SIZE}x{SIZE} resized to 299x299, batch {BATCH}',
      'images_per_s': {'flax': flax_rate, 'pytorch_fid': torch_rate,
                       'pytorch_fid_channels_last': channels_last_rate,
                       'ratio': flax_rate / torch_rate,
                       'ratio_vs_channels_last': flax_rate / channels_last_rate},
      'max_abs_pool_difference': float(np.abs(outputs['flax'] - outputs['torch']).max()),
      # the extractor's own jitted Inception, one batch
      'flax_flops': flops_report(extractor._apply, (extractor._params, images), BATCH / flax_rate),
  }
