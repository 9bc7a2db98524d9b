"""Patch-DM measurements: parameters vs ADM, compiled memory of one denoising step.

Parameters: the paper-scale PatchUNet (without a semantic encoder; the code
table is not counted) vs guided-diffusion's 256² unconditional ADM (the
paper quotes 70M vs 552M), and the latent DPM's MLP. Memory: XLA's compiled
argument + output + temp bytes of one denoising call at 1024×512, 2048×1024
and 4096×2048 for Patch-DM all patches at once (with feature collage),
Patch-DM streaming (bands of one patch row), and a full-image UNet with the
same layers (ADMUNet, 64 channels × (1, 2, 4, 8), attention where the patch
UNet has it: at 1/4 resolution). `*_temp_growth` is the streaming step's temp
memory divided by that at the previous size (width and height both double:
2 is linear in width, 4 in area); the argument (the image itself) is area.
Nothing runs for these: shapes are compiled, not executed.

Sampling speed: one denoising step of the paper-scale PatchUNet on a 256²
image (4×4 patches + the half-patch padding: 25 encoded, 16 collaged
patches) vs the full-image UNet of the same width at 256², random weights,
batch 1; images/s for DDIM-50 = 1 / (50 × step time).

Spatial sharding: per-device compiled memory of one paper-scale step at
2048×1024 with the patch rows split over 8 devices (`sharded_denoiser`; on 8
simulated CPU devices in a subprocess when this process has fewer), over the
same step on one device, and the bytes a device receives from its neighbour
per step (the halo: half a row of features at every decoder level).

Seams (the paper's ablation, Table 4.4 / Fig. 4.8): a tiny Patch-DM is trained
on the built-in photographs at 64×128 (4×8 patches of 16², 64 channels; SEAM_STEPS steps,
kept in $VISGEN_BENCH_DIR/patchdm_seam_model so a rerun reuses it), then the
same noise and table codes are sampled with feature collage, independent
patches and pixel-space shifted patches (`sample.patch_mode`); the seam score
(`patch_ablations.seam_score`) is measured at each mode's own patch borders,
and the samples are saved as one PNG per mode beside the model.
"""

import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from visgen_jax import image_io
from visgen_jax.bench.common import best_time, flops_report
from visgen_jax.models import patch_ablations
from visgen_jax.models.adm_unet import ADMUNet
from visgen_jax.models.latent_mlp import LatentMLP
from visgen_jax.models.patch_sharding import halo_bytes, sharded_denoiser
from visgen_jax.models.patch_unet import PatchUNet, collage_denoiser, grid_positions, streaming_denoiser
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

SIZES = ((512, 1024), (1024, 2048), (2048, 4096))
SHARD_SIZE, SHARD_DEVICES = (1024, 2048), 8
SEAM_STEPS = 1000
SEAM_SAMPLES = 8
# 64 channels, the paper's width: with the tiny variant's 32, each of GroupNorm's 32 groups is one
# channel, whose mean over the patch the norm removes, so the output cannot carry the patch mean of
# ε (measured: predicted patch-mean variance 0.00005 vs the noise's 0.0043 at t=800; 0.0012 with 64).
SEAM_OVERRIDES = ('data.resolution=64,128', 'sample.size=64,128', f'total_steps={SEAM_STEPS}',
                  'model.model_channels=64', 'batch_size=16', 'latent.enabled=false', 'optimizer.learning_rate=2e-4',
                  'optimizer.ema_decay=0.999', 'log_every=100', 'ckpt_every=500', 'sample_every=0',
                  # Raw parameters: after 1000 steps an EMA of 0.999 still holds 37% of the init.
                  f'sample.num={SEAM_SAMPLES}', 'sampler.steps=50', 'sample.use_ema=false',
                  'sample.code_index=' + ','.join(str(i) for i in range(SEAM_SAMPLES)))


def _count(shapes) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def _memory(fn, *args) -> dict:
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return {'total': int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes),
          'temp': int(stats.temp_size_in_bytes)}


def sharded_memory() -> dict:
  """One step at SHARD_SIZE split over SHARD_DEVICES devices vs on one device."""
  if jax.device_count() < SHARD_DEVICES:
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={SHARD_DEVICES}',
               JAX_PLATFORMS='cpu')
    code = 'import json; from visgen_jax.bench import patchdm; print(json.dumps(patchdm.sharded_memory()))'
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f'sharded_memory on {SHARD_DEVICES} simulated devices failed:\n{proc.stderr[-4000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])
  h, w = SHARD_SIZE
  t1 = jnp.zeros((1,), jnp.int32)
  patch = PatchUNet()
  params = jax.eval_shape(lambda k: patch.init(
      k, jnp.zeros((1, 2, 2, 64, 64, 3)), t1, jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 512)),
      decode='both'), jax.random.key(0))['params']
  grid = (h // 64, w // 64)
  pos, mask = grid_positions(grid, grid)
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  cond = (t1, jnp.zeros((1, 512)), jnp.ones((1,)))
  mesh = Mesh(np.asarray(jax.devices()[:SHARD_DEVICES]), ('rows',))
  one = _memory(lambda p, x: collage_denoiser(patch, p, pos, mask)(x, *cond), params, x)
  sharded = _memory(lambda p, x: sharded_denoiser(patch, p, pos, mask, mesh)(x, *cond), params, x)
  name, size = f'patchdm_sharded{SHARD_DEVICES}_per_device', f'{w}x{h}'
  return {f'memory_bytes_{name}_{size}': sharded['total'], f'memory_temp_bytes_{name}_{size}': sharded['temp'],
          f'memory_{name}_over_one_device_{size}': sharded['total'] / one['total'],
          f'memory_temp_{name}_over_one_device_{size}': sharded['temp'] / one['temp'],
          f'halo_bytes_per_step_{name}_{size}': sum(halo_bytes(patch, params, 1, grid[1] + 1))}


def seam_scores() -> dict:
  """Trains (or reuses) the tiny seam model and scores each patch mode's samples."""
  workdir = os.path.join(os.environ.get('VISGEN_BENCH_DIR', os.path.join(tempfile.gettempdir(), 'visgen_bench')),
                         'patchdm_seam_model')
  spec = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'patchdm_1k.py') + ':tiny'
  trainer.train(config_lib.load_config(spec, SEAM_OVERRIDES), workdir)
  result = {'seam_train_steps': SEAM_STEPS}
  for mode in patch_ablations.PATCH_MODES:
    config = config_lib.load_config(spec, SEAM_OVERRIDES + (f'sample.patch_mode={mode}',))
    s = trainer.setup(config)
    state, step = trainer.restore_latest(s, workdir)
    images = trainer.draw_samples(s, state, step)
    image_io.save_png(os.path.join(workdir, f'seams_{mode}.png'), image_io.image_grid(images))
    h, w = images.shape[1:3]
    patch = config.model.patch_size
    result[f'seam_score_{mode}'] = patch_ablations.seam_score(
        images, patch_ablations.patch_borders(mode, h, patch), patch_ablations.patch_borders(mode, w, patch))
  result['seam_samples_png_dir'] = workdir
  return result


def sampling_speed(key) -> dict:
  """DDIM-50 images/s at 256², Patch-DM (paper scale) vs a full-image UNet of the same width."""
  size, t1 = 256, jnp.zeros((1,), jnp.int32)
  patch = PatchUNet()
  x = jax.random.normal(key, (1, size, size, 3))
  patch_params = jax.jit(lambda k: patch.init(
      k, jnp.zeros((1, 2, 2, 64, 64, 3)), t1, jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 512)),
      decode='both')['params'])(key)
  pos, mask = grid_positions((4, 4), (4, 4))
  step_patch = jax.jit(collage_denoiser(patch, patch_params, pos, mask))
  full = ADMUNet(image_size=size, in_channels=3, model_channels=64, out_channels=3, num_res_blocks=2,
                 attention_resolutions=(size // 4,), channel_mult=(1, 2, 4, 8), use_scale_shift_norm=True,
                 resblock_updown=True)
  full_params = jax.jit(lambda k: full.init(k, x, t1)['params'])(key)
  step_full = jax.jit(lambda p, x: full.apply({'params': p}, x, t1))
  code, use = jnp.zeros((1, 512)), jnp.ones((1,))
  patch_time = best_time(lambda: step_patch(x, t1, code, use).block_until_ready())
  full_time = best_time(lambda: step_full(full_params, x).block_until_ready())
  return {'sampling_images_per_sec_ddim50_256_patchdm': 1 / (50 * patch_time),
          'sampling_images_per_sec_ddim50_256_full_unet': 1 / (50 * full_time),
          'sampling_speed_ratio_patchdm_over_full_unet': full_time / patch_time,
          'sampling_step_flops_patchdm': flops_report(step_patch, (x, t1, code, use), patch_time),
          'sampling_step_flops_full_unet': flops_report(step_full, (full_params, x), full_time)}


def run() -> dict:
  key = jax.random.key(0)
  t1 = jnp.zeros((1,), jnp.int32)
  patch = PatchUNet()
  patch_params = jax.eval_shape(lambda k: patch.init(
      k, jnp.zeros((1, 2, 2, 64, 64, 3)), t1, jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 512)),
      decode='both'), key)['params']
  adm256 = ADMUNet(image_size=256, in_channels=3, model_channels=256, out_channels=6, num_res_blocks=2,
                   attention_resolutions=(32, 16, 8), num_head_channels=64, channel_mult=(1, 1, 2, 2, 4, 4),
                   use_scale_shift_norm=True, resblock_updown=True)
  adm_params = jax.eval_shape(lambda k: adm256.init(k, jnp.zeros((1, 256, 256, 3)), t1), key)['params']
  latent_params = jax.eval_shape(lambda k: LatentMLP().init(k, jnp.zeros((1, 512)), t1), key)['params']
  result = {'params_patchdm_unet': _count(patch_params), 'params_adm_256': _count(adm_params),
            'params_latent_mlp': _count(latent_params)}

  previous_temp = None
  for h, w in SIZES:
    grid = (h // 64, w // 64)
    pos, mask = grid_positions(grid, grid)
    x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    cond = (t1, jnp.zeros((1, 512)), jnp.ones((1,)))
    step_patch = lambda p, x: collage_denoiser(patch, p, pos, mask)(x, *cond)
    step_stream = lambda p, x: streaming_denoiser(patch, p, pos, mask, 1)(x, *cond)
    full = ADMUNet(image_size=h, in_channels=3, model_channels=64, out_channels=3, num_res_blocks=2,
                   attention_resolutions=(h // 4,), channel_mult=(1, 2, 4, 8), use_scale_shift_norm=True,
                   resblock_updown=True)
    full_params = jax.eval_shape(lambda k: full.init(k, jnp.zeros((1, h, w, 3)), t1), key)['params']
    memory = {'full_unet': _memory(lambda p, x: full.apply({'params': p}, x, t1), full_params, x),
              'patchdm_all_at_once': _memory(step_patch, patch_params, x),
              'patchdm_streaming': _memory(step_stream, patch_params, x)}
    for name, m in memory.items():
      result[f'memory_bytes_{name}_{w}x{h}'] = m['total']
      result[f'memory_temp_bytes_{name}_{w}x{h}'] = m['temp']
    result[f'memory_streaming_over_full_unet_{w}x{h}'] = (memory['patchdm_streaming']['total']
                                                          / memory['full_unet']['total'])
    temp = memory['patchdm_streaming']['temp']
    if previous_temp:
      result[f'memory_streaming_temp_growth_{w}x{h}'] = temp / previous_temp
    previous_temp = temp
  result.update(sharded_memory())
  result.update(sampling_speed(key))
  result.update(seam_scores())
  return result
