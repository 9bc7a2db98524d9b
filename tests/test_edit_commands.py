"""The edit commands (diffusion.editing.commands): what they hand the sampler, and
ADM's --mode=inpaint / outpaint / sdedit on a tiny random-weight model."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from tests.helpers import random_params
from visgen_jax import image_io
from visgen_jax.diffusion import editing
from visgen_jax.errors import UserError
from visgen_jax.systems import adm
from visgen_jax.train import config as config_lib

TINY = 'configs/adm_ffhq256.py:tiny'


def save(path, array):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)
  return str(path)


def read_pngs(directory):
  names = sorted(os.listdir(directory))
  return names, np.stack([np.asarray(Image.open(os.path.join(directory, n))) for n in names if n != 'grid.png'])


def test_sdedit_starts_from_the_resized_input_at_the_strengths_level(tmp_path):
  seen = {}

  def run_sampler(params, key, x_T, start_step, x_start):
    seen.update(start_step=start_step, x_T_shape=x_T.shape)
    return x_start  # a sampler that stops at once: the images are its start

  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, 10:30] = 255  # the centre crop of the cover resize is white
  config = config_lib.load_config(TINY, [f'edit.input={save(tmp_path / "wide.png", wide)}', 'edit.strength=0.3',
                                         'sample.num=3'])
  sdedit = editing.commands(config, run_sampler, 10, (8, 8), 'model.image_size')['sdedit']
  sdedit(None, jax.random.key(0), str(tmp_path / 'run'))
  assert seen == dict(start_step=3, x_T_shape=(3, 8, 8, 3))
  names, images = read_pngs(tmp_path / 'run' / 'sdedit')
  assert names == ['00000.png', '00001.png', '00002.png', 'grid.png']
  np.testing.assert_array_equal(images, np.broadcast_to(image_io.resize_and_crop(wide, (8, 8), 'center'),
                                                        images.shape))


def test_edits_are_written_by_process_zero_only(tmp_path, monkeypatch):
  config = config_lib.load_config(TINY, [f'edit.input={save(tmp_path / "in.png", np.zeros((8, 8, 3)))}'])
  sdedit = editing.commands(config, lambda p, k, x, **options: x, 10, (8, 8), 'model.image_size')['sdedit']
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  sdedit(None, jax.random.key(0), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.fixture(scope='module')
def tiny_adm():
  """(config overrides, params) of ADM's tiny variant with random weights, 2 DDIM steps, 2 images."""
  overrides = ['sampler.steps=2', 'sample.num=2']
  system = adm.make(config_lib.load_config(TINY, overrides))
  shapes = jax.eval_shape(system.init, jax.random.key(0), {'image': jnp.zeros((1, 32, 32, 3))})
  return overrides, random_params(shapes)


def run_command(tiny_adm, name, workdir, *overrides):
  base, params = tiny_adm
  system = adm.make(config_lib.load_config(TINY, base + list(overrides)))
  system.commands[name](params, jax.random.key(1), str(workdir))
  return read_pngs(workdir / name)


def photo():
  return np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)


def test_adm_inpaint_keeps_the_black_part_of_the_mask(tmp_path, tiny_adm):
  holes = np.zeros((32, 32), np.uint8)
  holes[8:24, 4:20] = 255
  names, images = run_command(tiny_adm, 'inpaint', tmp_path / 'run', f'edit.input={save(tmp_path / "in.png", photo())}',
                              f'edit.mask={save(tmp_path / "holes.png", holes)}')
  assert names == ['00000.png', '00001.png', 'grid.png'] and images.shape == (2, 32, 32, 3)
  keep = holes == 0
  np.testing.assert_array_equal(images[:, keep], np.broadcast_to(photo()[keep], images[:, keep].shape))
  assert np.abs(images[:, ~keep].astype(int) - photo()[~keep]).mean() > 20  # the holes are new


def test_adm_outpaint_keeps_the_input_at_the_centre(tmp_path, tiny_adm):
  centre = np.full((16, 16, 3), 200, np.uint8)
  names, images = run_command(tiny_adm, 'outpaint', tmp_path / 'run',
                              f'edit.input={save(tmp_path / "centre.png", centre)}')
  assert names == ['00000.png', '00001.png', 'grid.png'] and images.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(images[:, 8:24, 8:24], 200)
  assert (images[:, :8] != 200).any()


def test_adm_sdedit_stays_near_the_input_at_low_strength(tmp_path, tiny_adm):
  given = f'edit.input={save(tmp_path / "in.png", photo())}'
  names, near = run_command(tiny_adm, 'sdedit', tmp_path / 'near', given, 'edit.strength=0.5')  # 1 of 2 steps
  assert names == ['00000.png', '00001.png', 'grid.png'] and near.shape == (2, 32, 32, 3)
  _, far = run_command(tiny_adm, 'sdedit', tmp_path / 'far', given, 'edit.strength=1.0')  # from pure noise
  distance = lambda images: np.abs(images.astype(int) - photo()).mean()
  assert distance(near) < 10 < distance(far)


@pytest.mark.parametrize('name, overrides, words', [
    ('sdedit', ['edit.input=/nonexistent/face.png'], ["config.edit.input='/nonexistent/face.png'", 'no such file']),
    ('sdedit', ['edit.strength=0.0'], ['config.edit.strength=0.0', '(0, 1]']),
    ('inpaint', ['mask:0'], ['config.edit.mask=', 'nothing to inpaint']),
    ('inpaint', ['mask:255'], ['covers everything']),
    ('inpaint', ['sampler.name=euler'], ["config.sampler.name='euler'", 'ddpm, ddim']),
    ('outpaint', ['input:32'], ['fills the whole 32x32 canvas (model.image_size)', 'covers everything']),
    ('outpaint', ['input:40'], ['larger than the canvas model.image_size=32x32']),
    ('outpaint', ['edit.resamples=0'], ['config.edit.resamples=0']),
])
def test_adm_edit_mistakes_are_one_sentence_before_anything_is_written(tmp_path, tiny_adm, name, overrides, words):
  """mask:V is a canvas-sized mask of value V (with a canvas-sized input), input:S an S×S input."""
  files = [f'edit.input={save(tmp_path / "in.png", photo())}']
  for item in overrides:
    kind, _, value = item.partition(':')
    if kind == 'mask':
      files.append(f'edit.mask={save(tmp_path / "mask.png", np.full((32, 32), int(value)))}')
    elif kind == 'input':
      files[0] = f'edit.input={save(tmp_path / "in.png", np.full((int(value),) * 2 + (3,), 90))}'
    else:
      files.append(item)
  with pytest.raises(UserError) as e:
    run_command(tiny_adm, name, tmp_path / 'run', *files)
  for word in words:
    assert word in str(e.value)
  assert not (tmp_path / 'run').exists()
