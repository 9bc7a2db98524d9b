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
Nothing runs: shapes are compiled, not executed.
"""

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.models.adm_unet import ADMUNet
from visgen_jax.models.latent_mlp import LatentMLP
from visgen_jax.models.patch_unet import PatchUNet, collage_denoiser, grid_positions, streaming_denoiser

SIZES = ((512, 1024), (1024, 2048), (2048, 4096))


def _count(shapes) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def _memory(fn, *args) -> dict:
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return {'total': int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes),
          'temp': int(stats.temp_size_in_bytes)}


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
  return result
