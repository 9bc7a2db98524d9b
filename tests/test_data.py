"""Tests of the folder builder, the sample set and the grain pipeline."""

import io
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from visgen_jax.data import folder
from visgen_jax.data import pipeline
from visgen_jax.data import sample_set
from visgen_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures('private_cache')


def data_config(**overrides):
  config = dict(name='sample', path='', resolution=16, random_flip=False,
                random_crop=False, worker_count=0, prefetch=0)
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def encoded(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
  """Good images of every kind, plus a corrupt and two truncated files."""
  src = tmp_path / 'src'
  (src / 'sub').mkdir(parents=True)
  rng = np.random.default_rng(0)
  noise = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)
  Image.fromarray(noise(40, 60, 3)).save(src / 'rgb.jpg')
  Image.fromarray(noise(30, 50)).save(src / 'gray.png')
  rgba = noise(24, 24, 4)
  rgba[..., 3] = 0  # Fully transparent: must come out white.
  Image.fromarray(rgba).save(src / 'sub' / 'rgba.png')
  Image.fromarray(noise(32, 32, 3)).save(src / 'photo.webp', lossless=True)
  (src / 'corrupt.jpg').write_bytes(b'this is not a jpeg')
  for fmt in ('png', 'jpeg'):
    data = encoded(noise(64, 64, 3), fmt)
    (src / f'truncated.{fmt}').write_bytes(data[:len(data) // 2])
  (src / 'notes.txt').write_text('not an image')
  return src


def test_build_skips_bad_files_and_converts_modes(messy_folder, tmp_path):
  out = tmp_path / 'ds'
  report = folder.build_image_dataset(messy_folder, out, (8, 12))
  assert report.num_examples == 4
  assert {name for name, _ in report.skipped} == {
      'corrupt.jpg', 'truncated.png', 'truncated.jpeg'}
  assert sorted(report.converted) == [('gray.png', 'L'),
                                      ('sub/rgba.png', 'RGBA')]
  assert report.ignored_files == 1
  summary = report.summary()
  for name in ('corrupt.jpg', 'truncated.png', 'truncated.jpeg'):
    assert name in summary

  source, info = pipeline.make_dataset_source(
      data_config(name='folder', path=str(out), resolution=(8, 12)))
  assert info.num_examples == 4 and info.resolution == (8, 12)
  examples = [source[i] for i in range(len(source))]
  assert [int(e['index']) for e in examples] == [0, 1, 2, 3]
  assert [e['file_name'] for e in examples] == [
      b'gray.png', b'photo.webp', b'rgb.jpg', b'sub/rgba.png']
  for e in examples:
    assert e['image'].shape == (8, 12, 3) and e['image'].dtype == np.uint8
  gray = examples[0]['image']
  assert np.array_equal(gray[..., 0], gray[..., 1])
  assert np.array_equal(gray[..., 0], gray[..., 2])
  assert np.all(examples[3]['image'] == 255)
  with open(out / folder.REPORT_FILE) as f:
    assert len(json.load(f)['skipped']) == 3


def test_random_crop_build_depends_only_on_seed(messy_folder, tmp_path):
  def images(name, seed):
    folder.build_image_dataset(messy_folder, tmp_path / name, 16, 'random',
                               seed=seed)
    source, _ = pipeline.make_dataset_source(data_config(
        name='folder', path=str(tmp_path / name)))
    return np.stack([source[i]['image'] for i in range(len(source))])

  a, b = images('a', 0), images('b', 0)
  assert np.array_equal(a, b)
  # Two images have 9 and 12 crop positions: three seeds cannot all agree
  # unless the seed is ignored (seeds 0 and 1 happen to agree).
  assert not all(np.array_equal(a, images(f's{seed}', seed))
                 for seed in (1, 2, 3))


def test_interrupted_build_leaves_nothing(messy_folder, tmp_path, monkeypatch):
  prepare = folder._prepare

  def prepare_then_die(src_dir, name, hw, crop, seed, ordinal):
    if ordinal == 2:
      raise RuntimeError('simulated crash')
    return prepare(src_dir, name, hw, crop, seed, ordinal)

  monkeypatch.setattr(folder, '_prepare', prepare_then_die)
  out = tmp_path / 'ds'
  with pytest.raises(RuntimeError, match='simulated crash'):
    folder.build_image_dataset(messy_folder, out, 8)
  assert sorted(os.listdir(tmp_path)) == ['src']
  with pytest.raises(UserError, match='no dataset at'):
    pipeline.make_dataset_source(data_config(name='folder', path=str(out)))


def test_build_rejects_bad_arguments(messy_folder, tmp_path):
  with pytest.raises(UserError, match='not a directory'):
    folder.build_image_dataset(tmp_path / 'missing', tmp_path / 'a', 8)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='no jpg/jpeg/png/webp files'):
    folder.build_image_dataset(tmp_path / 'empty', tmp_path / 'a', 8)
  with pytest.raises(UserError, match='already exists'):
    folder.build_image_dataset(messy_folder, messy_folder, 8)
  with pytest.raises(UserError, match='resolution'):
    folder.build_image_dataset(messy_folder, tmp_path / 'a', '8,x')
  with pytest.raises(UserError, match='crop'):
    folder.build_image_dataset(messy_folder, tmp_path / 'a', 8, crop='left')
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'x.png').write_bytes(b'not a png')
  with pytest.raises(UserError, match='no readable images'):
    folder.build_image_dataset(tmp_path / 'bad', tmp_path / 'a', 8)
  assert not os.path.exists(tmp_path / 'a')


def test_command_line(messy_folder, tmp_path, capsys):
  out = str(tmp_path / 'ds')
  args = [f'--src={messy_folder}', f'--out={out}', '--resolution=8,12']
  assert folder.main(args) == 0
  assert 'corrupt.jpg' in capsys.readouterr().out
  assert folder.main(args) == 2
  assert 'already exists' in capsys.readouterr().err
  report = folder.build_image_dataset(messy_folder, out, 8, exist_ok=True)
  assert report.reused_existing and report.num_examples == 4
  assert len(report.skipped) == 3


def test_sample_sets_build_offline_once(monkeypatch):
  path = sample_set.sample_dataset_dir('sample', 16)
  faces = sample_set.sample_dataset_dir('sample_faces', 16)
  assert path != faces

  def no_rebuild(*args, **kwargs):
    raise AssertionError('the cached sample set was rebuilt')

  monkeypatch.setattr(folder, 'build_image_dataset', no_rebuild)
  _, info = pipeline.make_dataset_source(data_config(name='sample'))
  assert info.path == path
  assert info.num_examples == len(sample_set.PHOTOS) + sample_set.NUM_FACES
  _, info = pipeline.make_dataset_source(data_config(name='sample_faces'))
  assert info.num_examples == sample_set.NUM_FACES


def test_concurrent_first_use_builds_one_dataset(tmp_path):
  code = ('from visgen_jax.data import sample_set; '
          'print(sample_set.sample_dataset_dir("sample_faces", 8))')
  env = dict(os.environ, VISGEN_CACHE=str(tmp_path), PYTHONPATH=REPO)
  procs = [subprocess.Popen([sys.executable, '-c', code], env=env,
                            stdout=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate()[0].strip() for p in procs]
  assert [p.returncode for p in procs] == [0, 0]
  assert outs[0] == outs[1]
  assert os.listdir(tmp_path / 'datasets') == [os.path.basename(outs[0])]
  _, info = pipeline.make_dataset_source(
      data_config(name='folder', path=outs[0], resolution=8))
  assert info.num_examples == sample_set.NUM_FACES


def test_dataset_errors_name_the_key(tmp_path):
  with pytest.raises(UserError, match=r"data.path: no dataset at '/x'.*"
                     r'data_prep/build_image_dataset.py'):
    pipeline.make_dataset_source(data_config(name='folder', path='/x'))
  with pytest.raises(UserError, match='data.path: empty'):
    pipeline.make_dataset_source(data_config(name='folder'))
  with pytest.raises(UserError, match='data.name'):
    pipeline.make_dataset_source(data_config(name='imagenet'))
  with pytest.raises(UserError, match='data.resolution'):
    path = sample_set.sample_dataset_dir('sample', 16)
    pipeline.make_train_iterator(
        data_config(name='folder', path=path, resolution=8),
        local_batch_size=2, seed=0)


def first_batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_processes_read_disjoint_slices_of_the_single_process_batches():
  n = len(sample_set.PHOTOS) + sample_set.NUM_FACES  # 114 = 2 x 3 x 19
  make = lambda b, index, count: pipeline.make_train_iterator(
      data_config(random_flip=True), local_batch_size=b, seed=0,
      process_index=index, process_count=count)
  single = first_batches(make(38, 0, 1), 6)  # Two epochs of 3 global batches.
  parts = [first_batches(make(19, index, 2), 6) for index in range(2)]
  for k, batch in enumerate(single):
    for key in ('index', 'image'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key])
    assert not set(parts[0][k]['index']) & set(parts[1][k]['index'])
  first = np.concatenate([b['index'] for b in single[:3]])
  second = np.concatenate([b['index'] for b in single[3:]])
  assert sorted(first) == sorted(second) == list(range(n))
  assert not np.array_equal(first, second)  # Reshuffled each epoch.


def test_batches_are_flipped_sources_in_minus_one_one():
  config = data_config(random_flip=True)
  source, _ = pipeline.make_dataset_source(config)
  it = pipeline.make_train_iterator(config, local_batch_size=8, seed=3)
  flips = 0
  for batch in first_batches(it, 4):
    assert batch['image'].dtype == np.float32
    assert batch['image'].shape == (8, 16, 16, 3)
    assert batch['index'].dtype == np.int32
    for image, index in zip(batch['image'], batch['index']):
      assert -1 <= image.min() and image.max() <= 1
      uint8 = np.round((image + 1) * 127.5).astype(np.uint8)
      stored = source[int(index)]['image']
      flipped = np.array_equal(uint8, stored[:, ::-1])
      assert flipped or np.array_equal(uint8, stored)
      flips += flipped and not np.array_equal(stored, stored[:, ::-1])
  assert 0 < flips < 32


def test_same_seed_same_batches_and_exact_resume():
  config = data_config(random_flip=True, random_crop=True, prefetch=2)
  make = lambda seed: pipeline.make_train_iterator(
      config, local_batch_size=5, seed=seed, process_index=1, process_count=2)
  reference = first_batches(make(7), 8)
  assert reference[0]['image'].shape == (5, 16, 16, 3)
  other = first_batches(make(8), 1)[0]
  assert not np.array_equal(other['index'], reference[0]['index'])

  interrupted = make(7)
  first_batches(interrupted, 3)
  state = json.loads(json.dumps(interrupted.get_state()))
  resumed = make(7)
  resumed.set_state(state)
  for expected, got in zip(reference[3:], first_batches(resumed, 5)):
    np.testing.assert_array_equal(got['index'], expected['index'])
    np.testing.assert_array_equal(got['image'], expected['image'])

  with pytest.raises(UserError, match='data iterator'):
    pipeline.make_train_iterator(config, local_batch_size=4, seed=7,
                                 process_index=1, process_count=2
                                 ).set_state(state)

  # The state is the same on every process: process 0's copy resumes process 1.
  process0 = pipeline.make_train_iterator(
      config, local_batch_size=5, seed=7, process_index=0, process_count=2)
  first_batches(process0, 3)
  assert process0.get_state() == state
  resumed = make(7)
  resumed.set_state(process0.get_state())
  np.testing.assert_array_equal(next(resumed)['image'], reference[3]['image'])


def test_example_batch_matches_real_batches():
  config = data_config(resolution=(16, 8), random_crop=True)
  example = pipeline.example_batch(config, 3)
  batch = next(pipeline.make_train_iterator(config, local_batch_size=3, seed=0))
  for key in ('image', 'index'):
    assert example[key].shape == batch[key].shape
    assert example[key].dtype == batch[key].dtype


def test_example_iterator_resumes_only_runs_that_read_no_data():
  config = data_config()
  reads_none = pipeline.ExampleIterator(config, 2)
  state = json.loads(json.dumps(reads_none.get_state()))
  pipeline.ExampleIterator(config, 2).set_state(state)
  np.testing.assert_array_equal(next(reads_none)['image'], pipeline.example_batch(config, 2)['image'])

  reads_data = pipeline.make_train_iterator(config, local_batch_size=2, seed=0)
  first_batches(reads_data, 1)
  with pytest.raises(UserError, match='read data, this one reads none'):
    pipeline.ExampleIterator(config, 2).set_state(reads_data.get_state())
  with pytest.raises(UserError, match='data iterator'):
    pipeline.make_train_iterator(config, local_batch_size=2, seed=0).set_state(state)


def test_worker_processes_give_the_same_batches():
  make = lambda workers: pipeline.make_train_iterator(
      data_config(random_flip=True, worker_count=workers, prefetch=2),
      local_batch_size=4, seed=1)
  with make(0) as plain, make(1) as workers:
    for a, b in zip(first_batches(plain, 3), first_batches(workers, 3)):
      np.testing.assert_array_equal(a['image'], b['image'])


def test_eval_iterator_is_one_ordered_pass_over_the_shard():
  # With random_crop the faces are stored at 18 x 18; eval crops the centre.
  config = data_config(name='sample_faces', random_crop=True)
  source, info = pipeline.make_dataset_source(config)
  assert info.resolution == (18, 18)
  it = pipeline.make_eval_iterator(config, local_batch_size=16,
                                   process_index=1, process_count=3)
  batches = list(it)
  assert [len(b['index']) for b in batches] == [16, 16, 1]
  np.testing.assert_array_equal(
      np.concatenate([b['index'] for b in batches]), np.arange(1, 100, 3))
  image = np.round((batches[0]['image'][1] + 1) * 127.5).astype(np.uint8)
  np.testing.assert_array_equal(image, source[4]['image'][1:17, 1:17])
