"""A data source added in this file alone: registered with the decorator, then
read, flipped, validated and trained on through the public entry points."""

import ml_collections
import numpy as np
import pytest

from tests.helpers import ROOT
from visgen_jax import data
from visgen_jax.data import folder
from visgen_jax.data import pipeline
from visgen_jax.data import registry
from visgen_jax.errors import UserError
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

NUM_EXAMPLES = 12


def _record(i: int, hw) -> dict:
  """Random image, surface normals and mask; content in the left w - i % 3
  columns, zero padding after (as sources that pad say with 'valid_hw')."""
  h, w = hw
  rng = np.random.default_rng(i)
  width = w - i % 3
  record = {'image': np.zeros((h, w, 3), np.uint8),
            'normal': np.zeros((h, w, 3), np.float32),
            'mask': np.zeros((h, w), bool),
            'valid_hw': np.array([h, width], np.int32), 'index': i}
  record['image'][:, :width] = rng.integers(1, 256, (h, width, 3))
  record['normal'][:, :width] = rng.normal(size=(h, width, 3))
  record['mask'][:, :width] = rng.random((h, width)) > 0.5
  return record


def _example(record, rng=None):
  del rng  # no augmentation of its own
  return {**record, 'index': np.int32(record['index'])}


def _to_float(batch):
  return {**batch, 'image': batch['image'].astype(np.float32) / 127.5 - 1}


@registry.register('test_normals')
class Normals(registry.Source):
  """DiffusionRig-like examples: an image with normals and a mask, in memory."""
  keys = ('resolution',)

  def open(self, data_config):
    hw = folder.parse_resolution(data_config.resolution, 'data.resolution')
    records = [_record(i, hw) for i in range(NUM_EXAMPLES)]
    return records, registry.SourceInfo(self.name, path='(in memory)',
                                        num_examples=NUM_EXAMPLES)

  def spec(self, data_config):
    h, w = folder.parse_resolution(data_config.resolution, 'data.resolution')
    feature = registry.Feature
    return {'image': feature((h, w, 3), np.float32, width_axis=1),
            # The x component points the other way in a mirrored image.
            'normal': feature((h, w, 3), np.float32, width_axis=1,
                              flip_sign=(-1, 1, 1)),
            'mask': feature((h, w), np.bool_, width_axis=1),
            'valid_hw': feature((2,), np.int32),
            'index': feature((), np.int32)}

  def transform(self, data_config, info, train):
    return _example

  def finish(self, data_config, info):
    return _to_float


@registry.register('test_wrong_spec')
class WrongSpec(Normals):
  """Says its masks are uint8; its batches hold bool."""

  def spec(self, data_config):
    spec = super().spec(data_config)
    return {**spec, 'mask': registry.Feature(spec['mask'].shape, np.uint8)}


def data_config(**overrides):
  config = dict(name='test_normals', path='', resolution=(6, 8),
                random_flip=True, random_crop=False, worker_count=0, prefetch=0)
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def test_flips_mirror_every_spatial_key_together_and_negate_normal_x():
  config = data_config()
  records, info = pipeline.make_dataset_source(config)
  assert info.num_examples == NUM_EXAMPLES
  it = pipeline.make_train_iterator(config, local_batch_size=6, seed=0)
  flips = 0
  for _ in range(4):
    batch = next(it)
    for b, index in enumerate(batch['index']):
      record = records[int(index)]
      width = record['valid_hw'][1]
      flipped = not np.array_equal(batch['mask'][b], record['mask'])
      mirror = (lambda a: np.concatenate([a[:, width - 1::-1], a[:, width:]],
                                         axis=1)) if flipped else (lambda a: a)
      np.testing.assert_array_equal(batch['mask'][b], mirror(record['mask']))
      np.testing.assert_array_equal(
          batch['image'][b], mirror(record['image']) / np.float32(127.5) - 1)
      sign = np.array([-1, 1, 1], np.float32) if flipped else 1
      np.testing.assert_array_equal(batch['normal'][b],
                                    mirror(record['normal']) * sign)
      np.testing.assert_array_equal(batch['valid_hw'][b], record['valid_hw'])
      flips += flipped
  assert 0 < flips < 24
  eval_batch = next(pipeline.make_eval_iterator(config, local_batch_size=4))
  np.testing.assert_array_equal(eval_batch['normal'],
                                [r['normal'] for r in records[:4]])


def test_example_batch_comes_from_the_spec():
  config = data_config()
  example = pipeline.example_batch(config, 3)
  batch = next(pipeline.make_train_iterator(config, local_batch_size=3,
                                            seed=1))
  assert set(example) == set(batch)
  for key, value in batch.items():
    assert example[key].shape == value.shape, key
    assert example[key].dtype == value.dtype, key
  with pytest.raises(ValueError, match="'test_wrong_spec'.*mask"):
    next(pipeline.make_train_iterator(data_config(name='test_wrong_spec'),
                                      local_batch_size=3, seed=1))


def test_validate_refuses_settings_the_source_does_not_read():
  data.validate(data_config())  # unset keys it does not read are fine
  with pytest.raises(UserError, match=r"^data.path='/data/x' needs "
                     r"data.name=folder or image_folder or rig_folder or segmentation, but data.name is "
                     r"'test_normals'"):
    data.validate(data_config(path='/data/x'))
  with pytest.raises(UserError, match=r'data.random_crop=True needs '
                     r'data.name=folder or sample or sample_faces'):
    pipeline.make_train_iterator(data_config(random_crop=True),
                                 local_batch_size=2, seed=0)
  with pytest.raises(UserError, match=r"data.name: 'normals' is unknown; the "
                     r'registered sources are .*test_normals'):
    pipeline.example_batch(data_config(name='normals'), 2)


def test_trains_through_the_trainer(tmp_path):
  config = config_lib.load_config(f'{ROOT}/configs/adm_ffhq256.py:tiny', [
      'data.name=test_normals', 'data.resolution=16', 'model.image_size=16',
      'model.channel_mult=1', 'batch_size=4', 'total_steps=2',
      'sample_every=0', 'log_every=1', 'ckpt_every=2'])
  trainer.train(config, str(tmp_path))
  assert (tmp_path / 'checkpoints' / '2').is_dir()
