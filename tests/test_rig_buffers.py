"""DiffusionRig buffer datasets: data_prep/build_buffer_dataset.py (albums' mean FLAME shape
included), the 'rig_folder' source, and stage 1 trained on one."""

import json
import os
import re

import numpy as np
import pytest

from tests.test_train import final_state
from visgen_jax import image_io
from visgen_jax.data import pipeline, rig_buffers, rig_subjects
from visgen_jax.errors import UserError
from visgen_jax.systems import get_system
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer, weights

RES = 16
# float16 rounding of values of magnitude <= 2 (rendered may exceed 1 a little).
HALF_PRECISION = 2 ** -10


def good_pair(seed):
  rng = np.random.default_rng(seed)
  light = rig_subjects.random_light(rng)
  example = rig_subjects.render(seed % rig_subjects.NUM_SUBJECTS, light, 0.1, -0.1, RES)
  image = image_io.to_uint8(example['image'][None])[0]
  buffers = {k: example[k] for k in ('normal', 'albedo', 'alpha', 'rendered')}
  return image, dict(buffers, light=light)


def write_pair(images, buffers_dir, name, image, buffers):
  image_io.save_png(os.path.join(images, f'{name}.png'), image)
  np.savez(os.path.join(buffers_dir, f'{name}.npz'), **buffers)


@pytest.fixture
def folders(tmp_path):
  images, buffers = tmp_path / 'images', tmp_path / 'buffers'
  images.mkdir()
  buffers.mkdir()
  return str(images), str(buffers)


def rig_folder_config(path, *overrides):
  return config_lib.load_config('configs/diffusionrig_stage1.py:tiny', [
      f'data.resolution={RES}', 'model.image_size=16', 'data.name=rig_folder', f'data.path={path}',
      'data.subjects=', *overrides])


def build(folders, out, *flags):
  """data_prep/build_buffer_dataset.py's command line, in process; exit code 0."""
  images, buffers = folders
  assert rig_buffers.main([f'--images={images}', f'--buffers={buffers}', f'--out={out}', f'--resolution={RES}',
                           *flags]) == 0


def test_a_good_pair_builds_and_reads_back_equal(folders, tmp_path):
  image, buffers = good_pair(0)
  flame = {k: np.random.default_rng(1).normal(size=n).astype(np.float32)
           for k, n in rig_buffers.FLAME_SIZES.items()}
  write_pair(*folders, 'a', image, dict(buffers, **flame))
  del buffers['rendered']  # computed by the builder
  write_pair(*folders, 'b', image, buffers)
  out = str(tmp_path / 'ds')
  report = rig_buffers.build_buffer_dataset(*folders, out, RES)
  assert (report.num_examples, report.num_with_flame, report.skipped) == (2, 1, [])

  config = rig_folder_config(out)
  records, info = pipeline.make_dataset_source(config.data)
  assert info.num_examples == 2
  a, b = records[0], records[1]
  assert a['file_name'] == b'a.png' and a['flame'] and not b['flame']
  np.testing.assert_array_equal(a['image'], image)
  for key in ('normal', 'albedo', 'alpha', 'rendered'):
    np.testing.assert_allclose(a[key], good_pair(0)[1][key], atol=HALF_PRECISION, err_msg=key)
  np.testing.assert_allclose(b['rendered'], a['rendered'], atol=HALF_PRECISION)
  np.testing.assert_array_equal(a['light'], buffers['light'])
  for key, value in flame.items():
    np.testing.assert_array_equal(a[key], value)
    np.testing.assert_array_equal(b[key], 0)

  batch = next(pipeline.make_train_iterator(config.data, local_batch_size=2, seed=0))
  spec = rig_subjects.spec((RES, RES), rig_buffers.PHYSICAL_SIZE)
  assert {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == {
      k: (f.shape, np.dtype(f.dtype)) for k, f in spec.items()}
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  first = batch['physical'][list(batch['index']).index(0)]  # 'a': the light, then the FLAME parameters
  np.testing.assert_array_equal(first, np.concatenate([buffers['light'].ravel(), *flame.values()]))

  vector = rig_folder_config(out, 'data.random_flip=False', 'model.condition=vector', 'model.in_channels=3',
                             'batch_size=2')
  with pytest.raises(UserError, match=r"1 of its 2 images have no FLAME parameters, which "
                                      r"config.model.condition='vector' needs"):
    get_system(vector)


def bad_pairs():
  """name -> (buffers, words the reason must hold)."""
  _, good = good_pair(0)
  small = good_pair(0)[1]['normal'][:8, :8]
  return {
      'small_normal': (dict(good, normal=small), r'normal has shape \(8, 8, 3\); allowed: \(16, 16, 3\)'),
      'four_channels': (dict(good, albedo=np.concatenate([good['albedo'], good['alpha'][..., None]], -1)),
                        r'albedo has shape \(16, 16, 4\); allowed: \(16, 16, 3\)'),
      'half_normals': (dict(good, normal=good['normal'] * 0.9),
                       r'normal has lengths in \[0.9, 0.9\] inside the mask .*allowed: unit length'),
      'light_4x3': (dict(good, light=good['light'][:4]), r'light has shape \(4, 3\); allowed: \(9, 3\)'),
      'relit': (dict(good, rendered=good['rendered'] * 1.1), r'rendered differs from sh_lighting.shade'),
      'no_light': ({k: v for k, v in good.items() if k != 'light'}, r'no light; required'),
      'some_flame': (dict(good, shape=np.zeros(100)), r'FLAME parameters shape only; allowed: all'),
  }


def test_each_bad_pair_is_reported_and_skipped(folders, tmp_path):
  image, good = good_pair(0)
  write_pair(*folders, 'good', image, good)
  bad = bad_pairs()
  for name, (buffers, _) in bad.items():
    write_pair(*folders, name, image, buffers)
  image_io.save_png(os.path.join(folders[0], 'no_buffers.png'), image)
  image_io.save_png(os.path.join(folders[0], 'big.png'), np.zeros((RES, 2 * RES, 3), np.uint8))

  report = rig_buffers.build_buffer_dataset(*folders, str(tmp_path / 'ds'), RES)
  assert report.num_examples == 1
  reasons = dict(report.skipped)
  assert set(reasons) == {f'{n}.png' for n in bad} | {'no_buffers.png', 'big.png'}
  for name, (_, words) in bad.items():
    assert re.search(words, reasons[f'{name}.png']), (name, reasons[f'{name}.png'])
  assert 'no buffers no_buffers.npz' in reasons['no_buffers.png']
  assert 'the image is 16x32; allowed: 16x16' in reasons['big.png']
  assert 'big.png: the image is 16x32' in report.summary()


def test_no_valid_pair_is_an_error_and_writes_nothing(folders, tmp_path, capsys):
  image, good = good_pair(0)
  write_pair(*folders, 'a', image, dict(good, light=good['light'].T))
  out = str(tmp_path / 'ds')
  assert rig_buffers.main([f'--images={folders[0]}', f'--buffers={folders[1]}', f'--out={out}',
                           f'--resolution={RES}']) == 2
  assert 'a.png: light has shape (3, 9); allowed: (9, 3)' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ['buffers', 'images']  # no dataset, no temporary directory


def test_rig_folder_refuses_another_resolution(folders, tmp_path):
  image, good = good_pair(0)
  write_pair(*folders, 'a', image, good)
  out = str(tmp_path / 'ds')
  rig_buffers.build_buffer_dataset(*folders, out, RES)
  config = rig_folder_config(out)
  config.data.resolution = 32
  with pytest.raises(UserError, match=r'data.resolution=32 does not match the \(16, 16\) images'):
    next(pipeline.make_train_iterator(config.data, local_batch_size=1, seed=0))


def test_stage1_trains_on_a_built_buffer_dataset(folders, tmp_path):
  for seed in range(8):
    write_pair(*folders, f'face{seed}', *good_pair(seed))
  out = str(tmp_path / 'ds')
  build(folders, out)
  workdir = str(tmp_path / 'run')
  # The step of test_diffusionrig's stage 1 (one batch of 8 at 16², one level): compiled once per test run.
  trainer.train(rig_folder_config(out, 'model.channel_mult=1', 'total_steps=2'), workdir)
  step, state = final_state(workdir)
  params = weights.flatten(state['params'])
  assert step == 2 and np.abs(params['unet/out_conv/kernel']).max() > 0  # zero-initialised, trained
  # The encoder's BatchNorm statistics moved from their initial 0 and 1 to the images' own.
  assert np.abs(params['batch_stats/encoder/bn1/mean']).max() > 0
  assert np.abs(params['batch_stats/encoder/bn1/var'] - 1).max() > 0


def test_an_album_records_its_mean_flame_shape(folders, tmp_path, capsys):
  image, buffers = good_pair(0)
  fixed = {k: np.zeros(n, np.float32) for k, n in rig_buffers.FLAME_SIZES.items() if k != 'shape'}
  shapes = np.random.default_rng(2).normal(size=(3, 100)).astype(np.float32)
  for i, shape in enumerate(shapes):
    write_pair(*folders, f'own{i}', image, dict(buffers, shape=shape, **fixed))
  write_pair(*folders, 'unfitted', image, buffers)
  out = str(tmp_path / 'own_shapes')
  build(folders, out, '--album')
  printed = capsys.readouterr().out
  with open(os.path.join(out, rig_buffers.ALBUM_FILE)) as f:
    album = json.load(f)
  mean = shapes.mean(0)
  np.testing.assert_allclose(album['mean_shape'], mean, rtol=1e-6)
  for i, shape in enumerate(shapes):
    distance = np.linalg.norm(shape - mean)
    assert album['distance_from_mean'][f'own{i}.png'] == pytest.approx(distance, rel=1e-5)
    assert f'own{i}.png: {distance:.4g}' in printed
  assert album['images_without_shape'] == ['unfitted.png'] and not album['buffers_use_mean_shape']
  assert 'export them from DECA with shape = mean_shape and rebuild' in printed

  # Exported again with the recorded mean, as the faithful recipe asks: the dataset says so.
  shape = np.asarray(album['mean_shape'], np.float32)
  for name in os.listdir(folders[0]):
    os.remove(os.path.join(folders[0], name))
  for i in range(3):
    write_pair(*folders, f'own{i}', image, dict(buffers, shape=shape, **fixed))
  out = str(tmp_path / 'mean_shape')
  build(folders, out, '--album')
  with open(os.path.join(out, rig_buffers.ALBUM_FILE)) as f:
    assert json.load(f)['buffers_use_mean_shape']
  assert "every image's buffers use one FLAME shape" in capsys.readouterr().out
  # Without --album (e.g. a stage-1 set of many people) there is no album file.
  build(folders, str(tmp_path / 'not_album'))
  assert not os.path.exists(os.path.join(tmp_path, 'not_album', rig_buffers.ALBUM_FILE))
