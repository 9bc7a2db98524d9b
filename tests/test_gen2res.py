"""Gen2Res at toy scale (visgen_jax/bench/gen2res_toy.py says why its comparisons mean something):
restoration helps, a constrained prior helps more; the commands' bad inputs."""

import re

import jax
import numpy as np
import pytest

from tests import helpers
from visgen_jax.bench import gen2res_toy as toy
from visgen_jax.data import folder
from visgen_jax.eval.image_quality import psnr
from visgen_jax.systems import gen2res
from visgen_jax.train import config as config_lib

CONFIG = 'configs/gen2res_ffhq.py:tiny'
K = 200
DRAWS = 3  # restorations of the same input with different noise: a comparison of means


def _mean_psnr(images, clean):
  return np.mean([psnr((image + 1) / 2, (clean + 1) / 2) for image in np.asarray(images)])


@pytest.fixture(scope='module')
def toy_psnr():
  config = toy.config()
  system = gen2res.make(config)
  subject, others = toy.faces()
  base = toy.train(system, config.optimizer, toy.init(system, others), others, toy.BASE_STEPS, seed=1)
  constrained = toy.train(system, config.optimizer, base, toy.personal_album(subject), toy.ALBUM_STEPS, seed=2)
  degraded = toy.degrade(subject, jax.random.key(3))
  restore = toy.restorer(config)
  draws = np.broadcast_to(degraded, (DRAWS, *degraded.shape))
  restored = lambda params: restore(params, draws, jax.random.key(10), start_step=K)
  return dict(degraded=_mean_psnr(degraded[None], subject), base=_mean_psnr(restored(base), subject),
              constrained=_mean_psnr(restored(constrained), subject))


def test_restoration_brings_the_clean_image_closer(toy_psnr):
  assert toy_psnr['constrained'] > toy_psnr['degraded'] + 1.0, toy_psnr


def test_constrained_prior_beats_unconstrained_at_the_same_k(toy_psnr):
  assert toy_psnr['constrained'] > toy_psnr['base'] + 0.5, toy_psnr  # measured: about 1 dB


def test_a_personal_album_fine_tunes_longer_than_a_generative_one():
  assert config_lib.load_config('configs/gen2res_ffhq.py').total_steps == 3000
  assert config_lib.load_config('configs/gen2res_ffhq.py:personal').total_steps == 5000


def _run(tmp_path, mode, *overrides):
  return helpers.run_main(f'--config={CONFIG}', f'--workdir={tmp_path / "w"}', f'--mode={mode}', *overrides)


@pytest.mark.parametrize('override, message', [
    ('--config.gen2res.start_step=0', r'config.gen2res.start_step=0 \(K\) must be an integer in \[1, 1000\]'),
    ('--config.gen2res.guidance_scale=nan', 'config.gen2res.guidance_scale=nan must be a finite number'),
])
def test_bad_settings_exit_2_writing_nothing(tmp_path, override, message):
  result = _run(tmp_path, 'album', override)
  assert result.returncode == 2, result.stderr[-2000:]
  assert re.search(message, result.stderr.strip().splitlines()[-1])
  assert not (tmp_path / 'w').exists()


def test_bad_inputs_exit_2_writing_nothing(tmp_path):
  album = tmp_path / 'album'
  face = np.zeros((32, 32, 3), np.uint8)
  for i in range(2):
    gen2res.image_io.save_png(str(album / f'{i}.png'), face)
  (tmp_path / 'broken.png').write_bytes(b'not an image')
  small = _run(tmp_path, 'finetune', f'--config.data.path={album}', f'--config.init_from={album}')
  unreadable = _run(tmp_path, 'restore', f'--config.gen2res.input={tmp_path / "broken.png"}')
  assert small.returncode == 2 and 'holds 2 images, fewer than config.batch_size=4' in small.stderr, small.stderr[-2000:]
  assert unreadable.returncode == 2, unreadable.stderr[-2000:]
  assert not (tmp_path / 'w').exists()
  assert folder.list_images(str(album))[0] == ['0.png', '1.png']


def _mtimes(directory):
  return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_whole_path_keeps_every_stage_and_a_rerun_resumes_at_the_restore(tmp_path):
  # :tiny with the toy's smaller model (it compiles in half the time), from random weights.
  toy.save_random_base(toy.config(), str(tmp_path / 'base'))
  photo = tmp_path / 'photo.jpg'  # read by its content; the restored image is photo.png
  gen2res.image_io.save_png(str(photo), np.random.default_rng(0).integers(0, 256, (24, 24, 3), np.uint8))
  args = (f'--config.init_from={tmp_path / "base"}', f'--config.gen2res.input={photo}',
          *(f'--config.{override}' for override in toy.OVERRIDES))
  first = _run(tmp_path, 'gen2res', *args)
  assert first.returncode == 0, first.stderr[-4000:]
  w = tmp_path / 'w'
  assert sorted(_mtimes(w / 'album')) == [f'{i:05d}.png' for i in range(4)] and (w / 'album.png').is_file()
  assert gen2res.checkpoint.latest_step(str(w / 'checkpoints')) == 20
  assert gen2res.image_io.read_rgb(str(w / 'restored' / 'photo.png'), 'restored').shape == (toy.RES, toy.RES, 3)
  assert 'Wrote an album of 4 images' in first.stdout and 'album: done' not in first.stdout, first.stdout[-2000:]
  kept = _mtimes(w / 'album'), _mtimes(w / 'checkpoints')

  second = _run(tmp_path, 'gen2res', *args)
  assert second.returncode == 0, second.stderr[-4000:]
  lines = second.stdout.splitlines()
  assert f'album: done, in {w / "album"}' in lines and 'finetune: done' in lines, second.stdout[-2000:]
  assert 'Wrote 1 restored images to ' + str(w / 'restored') in lines
  assert (_mtimes(w / 'album'), _mtimes(w / 'checkpoints')) == kept  # neither stage wrote again
