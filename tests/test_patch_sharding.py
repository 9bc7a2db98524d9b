"""Patch-DM's denoising step with the patch rows split over devices: the same
as one device, only border rows of features cross devices, wired into the
recipe. The 8-device checks run in a subprocess (`python -m
tests.test_patch_sharding`), since JAX fixes the device count when it starts."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from tests.helpers import ROOT, random_params
from visgen_jax.errors import UserError
from visgen_jax.models.patch_sharding import halo_bytes, rows_per_device, sharded_denoiser
from visgen_jax.models.patch_unet import PatchUNet, collage_denoiser, grid_positions
from visgen_jax.systems import get_system, patchdm
from visgen_jax.train import config as config_lib

TINY = 'configs/patchdm_1k.py:tiny'
DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2}


def permuted_bytes(lowered_text: str) -> list[int]:
  """Bytes of every collective_permute (ppermute) in lowered StableHLO."""
  sizes = []
  for dims, dtype in re.findall(r'collective_permute.*?-> tensor<((?:\d+x)+)(\w+)>', lowered_text):
    sizes.append(math.prod(int(d) for d in dims.rstrip('x').split('x')) * DTYPE_BYTES[dtype])
  return sizes


def check_on_devices() -> dict:
  """The 8-device measurements, as JSON for the test."""
  assert jax.device_count() == 8
  unet = PatchUNet(patch_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(), embed_dim=32, pos_channels=8, code_dim=8, dropout=0.0)
  shapes = jax.eval_shape(lambda k: unet.init(k, jnp.zeros((1, 2, 2, 8, 8, 3)), jnp.zeros((1,), jnp.int32),
                                              jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 8)), decode='both'),
                          jax.random.key(0))['params']
  params = random_params(shapes)
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ('data', 'fsdp'))
  result = {'cases': []}
  # 8 rows over both mesh axes (8 devices): 8 divides them, so the last device encodes the bottom
  # padding row itself. 29 rows: 4 per device (3 dummy rows), in bands of 2; positions beyond the
  # trained grid masked. 8 rows over fsdp (4 devices, 2 each), one image per data device.
  for rows, band, positions, batch_axes in ((8, 0, 'interpolate', ()), (29, 2, 'extend', ()),
                                            (8, 0, 'interpolate', 'data')):
    pos, mask = grid_positions((rows, 2), (4, 2), positions)
    rng = np.random.default_rng(rows)
    args = (jnp.asarray(rng.normal(size=(2, rows * 8, 16, 3)), jnp.float32), jnp.array([5, 700]),
            jnp.asarray(rng.normal(size=(2, 8)), jnp.float32), jnp.array([1.0, 0.0]))
    whole = jax.jit(collage_denoiser(unet, params, pos, mask))(*args)
    lowered = jax.jit(sharded_denoiser(unet, params, pos, mask, mesh, band_rows=band,
                                       batch_axes=batch_axes)).lower(*args)
    sharded = lowered.compile()(*args)
    result['cases'].append({
        'rows': rows, 'band': band, 'max_diff': float(jnp.abs(sharded - whole).max()),
        'mean_abs': float(jnp.abs(whole).mean()), 'permuted': permuted_bytes(lowered.as_text()),
        'halo': halo_bytes(unet, params, 1 if batch_axes else 2, 3), 'images_per_device': 1 if batch_axes else 2})

  # The recipe: --mode=sample with sample.shard_rows splits the rows over config.mesh's model axis
  # and the images over data × fsdp; it samples what one device samples.
  overrides = ['sample.size=64,64', 'sampler.steps=2', 'sample.num=4', 'latent.enabled=false']
  on_mesh = ['sample.shard_rows=True', 'mesh.data=2', 'mesh.fsdp=2', 'mesh.model=2']
  system = get_system(config_lib.load_config(TINY, overrides + on_mesh))
  batch = {'image': jnp.zeros((4, 32, 64, 3)), 'index': jnp.zeros((4,), jnp.int32)}
  params = random_params(jax.eval_shape(system.init, jax.random.key(0), batch))
  lowered = system.sample.lower(params, jax.random.key(1))
  result['recipe_permuted'] = permuted_bytes(lowered.as_text())
  one_device = get_system(config_lib.load_config(TINY, overrides)).sample(params, jax.random.key(1))
  result['recipe_max_diff'] = float(jnp.abs(lowered.compile()(params, jax.random.key(1)) - one_device).max())
  result['recipe_mean_abs'] = float(jnp.abs(one_device).mean())
  try:
    get_system(config_lib.load_config(TINY, on_mesh + ['sample.num=6']))
  except UserError as e:
    result['recipe_odd_batch_error'] = str(e)
  return result


@pytest.fixture(scope='module')
def on_8_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'tests.test_patch_sharding'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_step_equals_the_one_device_step(on_8_devices):
  for case in on_8_devices['cases']:
    assert case['mean_abs'] > 0.1, case
    # Not bit for bit: XLA's CPU kernels sum in another order for another number of patches.
    assert case['max_diff'] <= 1e-5, case


def test_only_one_row_of_features_per_level_crosses_devices(on_8_devices):
  for case in on_8_devices['cases']:
    # The upper half of one patch row (3 patches) of a device's images, float32: the bottleneck (4x4x64),
    # then the skips as the decoder takes them: ResBlock 4x4x64, Downsample 4x4x32, ResBlock 8x8x32, conv_in.
    assert case['halo'] == [case['images_per_device'] * 3 * 4 * n // 2
                            for n in (4 * 4 * 64, 4 * 4 * 64, 4 * 4 * 32, 8 * 8 * 32, 8 * 8 * 32)]
    assert sorted(case['permuted']) == sorted(case['halo']), case


def test_recipe_samples_with_the_rows_and_images_split(on_8_devices):
  assert on_8_devices['recipe_permuted'], 'sample.shard_rows=True did not split the rows'
  assert on_8_devices['recipe_mean_abs'] > 0.1
  # Each step's rounding (≤ 1e-5, above) goes through DDIM's x̂₀ = (x − √(1−ᾱ) ε̂) / √ᾱ, which
  # multiplies it by up to 1/√ᾱ; a wrong image, code or row would differ by ~0.1 or more.
  assert on_8_devices['recipe_max_diff'] <= 1e-4, on_8_devices['recipe_max_diff']
  assert 'sample.num=6 images do not split' in on_8_devices['recipe_odd_batch_error']


def test_rows_per_device_pads_to_whole_bands():
  assert rows_per_device(8, 8) == 1
  assert rows_per_device(5, 8) == 1
  assert rows_per_device(13, 8) == 2
  assert rows_per_device(29, 8, 2) == 4
  assert rows_per_device(30, 4, 3) == 9
  for band in (-1, 3):
    with pytest.raises(ValueError, match=f'band_rows={band}: each of the 8 devices'):
      rows_per_device(13, 8, band)


def test_bad_sharding_is_a_user_error():
  pos, mask = grid_positions((4, 2), (4, 2))
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  with pytest.raises(ValueError, match="axes.*'rows'.*not in the mesh"):
    sharded_denoiser(None, None, pos, mask, mesh, axes='rows')
  with pytest.raises(UserError, match='config.sample.stream_rows: band_rows=3: each of the 1 devices'):
    get_system(config_lib.load_config(TINY, ['sample.shard_rows=True', 'sample.stream_rows=3']))
  with pytest.raises(UserError, match="config.sample: shard_rows.*patch_mode='independent'"):
    patchdm.validate(config_lib.load_config(TINY, ['sample.shard_rows=True', 'sample.patch_mode=independent']))
  with pytest.raises(UserError, match='model axis.*1 device'):
    get_system(config_lib.load_config(TINY, ['sample.shard_rows=True']))
  with pytest.raises(ValueError, match=r"axes \['data'\] split both"):
    sharded_denoiser(None, None, pos, mask, mesh, axes='data', batch_axes='data')


if __name__ == '__main__':
  print(json.dumps(check_on_devices()))
