"""Patch-DM measurements: parameters vs ADM, compiled memory of one denoising step.

Parameters: the paper-scale PatchUNet (without a semantic encoder; the code
table is not counted) vs guided-diffusion's 256² unconditional ADM (the
paper quotes 70M vs 552M). Memory: XLA's compiled argument + output + temp
bytes of one denoising call at 1024×512 for Patch-DM (all patches at once,
with feature collage) and for a full-image UNet with the same layers
(ADMUNet, 64 channels × (1, 2, 4, 8), attention where the patch UNet has it:
at 1/4 resolution). Nothing runs: shapes are compiled, not executed.
"""

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.models.adm_unet import ADMUNet
from visgen_jax.models.patch_unet import PatchUNet, collage_denoiser, grid_positions

SIZES = ((512, 1024),)


def _count(shapes) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def _memory(fn, *args) -> int:
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


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
  result = {'params_patchdm_unet': _count(patch_params), 'params_adm_256': _count(adm_params)}

  for h, w in SIZES:
    grid = (h // 64, w // 64)
    pos, mask = grid_positions(grid, grid)
    x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    step_patch = lambda p, x: collage_denoiser(patch, p, pos, mask)(x, t1, jnp.zeros((1, 512)), jnp.ones((1,)))
    result[f'memory_bytes_patchdm_all_at_once_{w}x{h}'] = _memory(step_patch, patch_params, x)
    full = ADMUNet(image_size=h, in_channels=3, model_channels=64, out_channels=3, num_res_blocks=2,
                   attention_resolutions=(h // 4,), channel_mult=(1, 2, 4, 8), use_scale_shift_norm=True,
                   resblock_updown=True)
    full_params = jax.eval_shape(lambda k: full.init(k, jnp.zeros((1, h, w, 3)), t1), key)['params']
    result[f'memory_bytes_full_unet_{w}x{h}'] = _memory(lambda p, x: full.apply({'params': p}, x, t1),
                                                        full_params, x)
  return result
