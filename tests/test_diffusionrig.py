"""DiffusionRig end to end: the synthetic subjects (known buffers, flips), stage 1 → stage 2
(encoder and statistics bit-identical) → edits through the CLI, and bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import run_main
from tests.test_train import final_state
from visgen_jax import image_io
from visgen_jax.data import pipeline, rig_subjects
from visgen_jax.errors import UserError
from visgen_jax.models import sh_lighting
from visgen_jax.systems import diffusionrig, get_system
from visgen_jax.train import config as config_lib, trainer, weights

SMALL = ['--config.data.resolution=16', '--config.model.image_size=16', '--config.model.channel_mult=1']
STAGE1 = ['--config=configs/diffusionrig_stage1.py:tiny', *SMALL, '--config.total_steps=2', '--config.ckpt_every=2']
STAGE2 = ['--config=configs/diffusionrig_stage2.py:tiny', *SMALL]


def album_config(*overrides):
  return config_lib.load_config('configs/diffusionrig_stage2.py:tiny',
                                ['data.resolution=16', 'model.image_size=16', 'model.channel_mult=1', *overrides])


def test_subjects_have_exact_buffers_and_flips_negate_normal_x(private_cache):
  config = album_config()
  records = rig_subjects.records(config.data)
  assert len(records) == rig_subjects.IMAGES_PER_SUBJECT
  record = records[0]
  inside = record['alpha'] > 0
  np.testing.assert_allclose(np.linalg.norm(record['normal'][inside], axis=-1), 1, atol=1e-5)
  np.testing.assert_allclose(record['rendered'], np.asarray(sh_lighting.shade(
      record['normal'], record['albedo'], record['alpha'], record['light'])), atol=1e-5)

  it = pipeline.make_train_iterator(config.data, local_batch_size=16, seed=0)
  batch = next(it)
  flipped = 0
  for i, index in enumerate(batch['index']):
    want = records.arrays
    if np.array_equal(batch['image'][i], want['image'][index]):
      np.testing.assert_array_equal(batch['normal'][i], want['normal'][index])
      continue
    flipped += 1
    for key in ('image', 'rendered', 'albedo', 'alpha'):
      np.testing.assert_array_equal(batch[key][i], want[key][index][:, ::-1], err_msg=key)
    np.testing.assert_array_equal(batch['normal'][i], want['normal'][index][:, ::-1] * [-1, 1, 1])
  assert 0 < flipped < 16


def test_an_album_smaller_than_the_batch_is_refused(private_cache):
  with pytest.raises(UserError, match=r'config.batch_size=32 is larger than the 16 images'):
    get_system(album_config('batch_size=32', 'init_from=/somewhere'))


def write_example(directory, name, record, light=True, extra=()):
  path = os.path.join(directory, f'{name}.png')
  image_io.save_png(path, image_io.to_uint8(record['image'][None])[0])
  np.savez(os.path.join(directory, f'{name}.npz'),
           **{k: record[k] for k in ('normal', 'albedo', 'alpha', *(('light',) if light else ()), *extra)})
  return path


def test_edit_inputs_are_checked_as_datasets_are(tmp_path, private_cache):
  record = rig_subjects.records(album_config('data.subjects=all').data)[1]
  good = write_example(str(tmp_path), 'good', record, light=False)
  example = diffusionrig.read_example(good, 'config.edit.input', 16)
  assert example['light'].shape == (9, 3) and example['rendered'].shape == (16, 16, 3)
  short = write_example(str(tmp_path), 'short', dict(record, normal=0.5 * record['normal']))
  with pytest.raises(UserError, match=r"short.npz: normal has lengths in \[0.5, 0.5\] inside the mask"):
    diffusionrig.read_example(short, 'config.edit.input', 16)


def test_inverted_edits_start_from_the_noise_that_gives_back_the_input(tmp_path, private_cache):
  """A UNet blind to x_t and t (its input conv's x_t channels and time embedding zeroed) predicts one ε̂
  per buffers and code; DDIM and its inversion are then exact inverses, except that the input is taken
  as the sampler's first level (ᾱ = 1 − 1e-4): the round trip gives back input − √(1 − ᾱ)·ε̂ ≈ input −
  0.01·ε̂, less than one 8-bit step (2/255) for |ε̂| < 0.78 (here |ε̂| ≤ 0.44). Inverting with the relit
  buffers or all S levels instead of S − 1 misses by more than 100 steps."""
  face = write_example(str(tmp_path), 'face', rig_subjects.records(album_config('data.subjects=all').data)[1])
  config = album_config(f'edit.input={face}', 'edit.rotate_degrees=30', 'edit.invert=True')
  system = get_system(config)
  params = jax.jit(system.init)(jax.random.key(0), pipeline.example_batch(config.data, 2))
  unet = params['unet']
  unet['input_blocks_0_conv']['kernel'] = unet['input_blocks_0_conv']['kernel'].at[:, :, :3].set(0)
  unet['time_embed_1']['kernel'] = jnp.zeros_like(unet['time_embed_1']['kernel'])
  unet['out_conv']['kernel'] = 0.01 * jax.random.normal(jax.random.key(1), unet['out_conv']['kernel'].shape)
  errors = {}
  for invert in (True, False):
    config.edit.invert = invert
    workdir = str(tmp_path / f'invert_{invert}')
    system.commands['edit'](params, jax.random.key(2), workdir)
    output = image_io.read_rgb(os.path.join(workdir, 'edit', 'face_reconstruction.png'), 'output')
    errors[invert] = np.abs(output.astype(int) - image_io.read_rgb(face, 'input')).max()
  assert errors[True] <= 1 and errors[False] > 50, errors

  config.sampler.name = 'ddpm'
  config.edit.invert = True
  with pytest.raises(UserError, match=r"config.edit.invert=True with config.sampler.name='ddpm', eta=0.0"):
    get_system(config).commands['edit'](params, jax.random.key(2), str(tmp_path / 'ddpm'))
  assert not (tmp_path / 'ddpm').exists()


def test_stage1_stage2_and_edits_through_the_cli(tmp_path, private_cache):
  env = {'VISGEN_CACHE': private_cache}
  first, second = str(tmp_path / 'stage1'), str(tmp_path / 'stage2')
  run_main(*STAGE1, f'--workdir={first}', env=env, check=True)
  run_main(*STAGE2, f'--workdir={second}', f'--config.init_from={first}', env=env, check=True)
  before, after = (weights.flatten(final_state(w)[1]['params']) for w in (first, second))
  encoder = [n for n in before if n.startswith(('encoder/', 'batch_stats/'))]
  assert any(n.startswith('batch_stats/') for n in encoder)
  for name in encoder:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  assert not np.array_equal(after['unet/out_conv/kernel'], before['unet/out_conv/kernel'])

  records = rig_subjects.records(album_config(f'init_from={first}', 'data.subjects=all').data)
  inputs = str(tmp_path / 'inputs')
  os.makedirs(inputs)
  face = write_example(inputs, 'face', records[1])
  other = write_example(inputs, 'other', records[40], light=False)  # its light is estimated
  np.save(os.path.join(inputs, 'bad_light.npy'), np.zeros((3, 9)))
  # The stage-2 workdir alone: commands restore it, init_from is for fresh runs.
  edit = [*STAGE2, f'--workdir={second}', '--mode=edit', f'--config.edit.input={face}']
  bad = run_main(*edit, f'--config.edit.light={inputs}/bad_light.npy', env=env)
  assert bad.returncode == 2 and "bad_light.npy' holds an array of shape (3, 9)" in bad.stderr
  assert not os.path.exists(os.path.join(second, 'edit'))

  # Model swap: stage 1's UNet (raw, as its config samples), read as init_from reads a workdir.
  swap_config = album_config(f'edit.model_from={first}')
  unet = jax.eval_shape(get_system(swap_config).init, jax.random.key(0),
                        pipeline.example_batch(swap_config.data, 2))['unet']
  swapped = weights.flatten(diffusionrig.swapped_unet(swap_config, unet))
  assert swapped.keys() == {n[len('unet/'):] for n in before if n.startswith('unet/')}
  for name, value in swapped.items():
    np.testing.assert_array_equal(value, before[f'unet/{name}'], err_msg=name)
  # ... from a workdir of another shape: the differing keys named, nothing written.
  wide = album_config(f'edit.model_from={first}', f'edit.input={face}', 'model.model_channels=64')
  shapes = jax.eval_shape(get_system(wide).init, jax.random.key(0), pipeline.example_batch(wide.data, 2))
  with pytest.raises(UserError, match=r'model_from=.* holds a UNet of another shape than this config builds '
                                      r'\(config.model.model_channels=64 \(the run has 32\)\)'):
    get_system(wide).commands['edit'](shapes, jax.random.key(0), str(tmp_path / 'wide'))
  assert not (tmp_path / 'wide').exists()

  run_main(*edit, '--config.edit.rotate_degrees=30', f'--config.edit.code_from={other}',
           f'--config.edit.buffers_from={other}', f'--config.edit.light_from={other}',
           f'--config.edit.model_from={first}', '--config.edit.invert=True', env=env, check=True)
  written = sorted(os.listdir(os.path.join(second, 'edit')))
  assert written == ['face_buffer_swap.png', 'face_code_swap.png', 'face_grid.png', 'face_model_swap.png',
                     'face_reconstruction.png', 'face_relight_from.png', 'face_rotate30.png']
  grid = image_io.read_rgb(os.path.join(second, 'edit', 'face_grid.png'), 'grid')
  assert grid.shape == (3 * 18 - 2, 4 * 18 - 2, 3)  # input, 3 buffers, reconstruction, 5 edits: 4x3


VECTOR = ('model.condition=vector', 'model.in_channels=3', 'data.random_flip=False')


def test_the_vector_conditioned_model_trains_and_edits(tmp_path, private_cache):
  config = config_lib.load_config('configs/diffusionrig_stage1.py:tiny', [
      'data.resolution=16', 'model.image_size=16', 'model.channel_mult=1', 'total_steps=1', *VECTOR])
  workdir = str(tmp_path / 'vector')
  params = trainer.train(config, workdir)['params']
  # The UNet's code layers take the encoder's 64-d code and the 32-d physical vector.
  code_inputs = {v.shape[0] for n, v in weights.flatten(params).items() if n.endswith('code_proj/kernel')}
  assert code_inputs == {64 + rig_subjects.PHYSICAL_SIZE}

  records = rig_subjects.records(config.data)
  inputs = str(tmp_path / 'inputs')
  os.makedirs(inputs)
  face = write_example(inputs, 'face', records[1], extra=rig_subjects.PHYSICAL)
  other = write_example(inputs, 'other', records[40], extra=rig_subjects.PHYSICAL)
  bare = write_example(inputs, 'bare', records[2])
  config.edit.update(input=face, rotate_degrees=(30,), buffers_from=other, code_from=other)
  trainer.run_command(config, workdir, 'edit')
  written = sorted(os.listdir(os.path.join(workdir, 'edit')))
  assert written == ['face_buffer_swap.png', 'face_code_swap.png', 'face_grid.png', 'face_reconstruction.png',
                     'face_rotate30.png']
  config.edit.input = bare
  with pytest.raises(UserError, match=r"bare.npz has head_pose of shape \(\); config.model.condition='vector' "
                                      r'needs light \(9, 3\), head_pose \(2,\), head_axes \(3,\)'):
    trainer.run_command(config, workdir, 'edit')


@pytest.mark.parametrize('overrides, message', [
    (('model.condition=vectors',), r"config.model.condition='vectors'; allowed: buffers, vector."),
    (('model.condition=vector',), r"config.model.in_channels=12; with config.model.condition='vector' the UNet "
                                  r'denoises x_t: 3.'),
    (('model.in_channels=3',), r"config.model.in_channels=3; .*'buffers' the UNet denoises x_t with its buffers: 12."),
    (('model.condition=vector', 'model.in_channels=3'), r'config.data.random_flip=True with config.model.condition'),
])
def test_settings_that_do_not_fit_the_conditioning_are_refused(overrides, message):
  config = config_lib.load_config('configs/diffusionrig_stage1.py:tiny', list(overrides))
  with pytest.raises(UserError, match=message):
    diffusionrig.validate(config)
