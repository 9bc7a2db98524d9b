"""Gen2Res at toy scale: restoration helps, a constrained prior helps more; the commands' bad inputs.

The toy (why its comparisons mean something): a "subject" is one built-in face; its personal
album is that face shifted by a pixel and re-exposed (other photos of the same person), without
the test photo itself (the face as it is). The base model is a tiny ADM trained briefly on the
other faces, so it knows faces in general but not the subject; the degradation (2x
downsampling, blur, noise) destroys detail that only knowledge of the subject brings back. A
constrained prior (the base fine-tuned on the album) must then restore the test photo better
than the unconstrained base at the same K, and better than leaving it degraded.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import skimage.data

from tests import helpers
from visgen_jax.data import folder
from visgen_jax.diffusion import restoration, schedules
from visgen_jax.systems import gen2res
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

CONFIG = 'configs/gen2res_ffhq.py:tiny'
RES = 16
K = 200


def _config():
  c = config_lib.load_config(CONFIG, [f'data.resolution={RES}', f'model.image_size={RES}',
                                      'model.channel_mult=1', 'model.attention_resolutions=',
                                      'optimizer.learning_rate=2e-3'])
  return c


def _faces():
  """The built-in faces at RES², in [-1, 1]."""
  faces = skimage.data.lfw_subset()[:100]
  small = jax.image.resize(jnp.asarray(faces, jnp.float32), (100, RES, RES), 'linear')
  return jnp.repeat(small[..., None] * 2 - 1, 3, axis=-1)


def _album(face):
  """The subject's other photos: shifted by a pixel and re-exposed, never the face as it is."""
  shots = [jnp.roll(face, shift, axis) * gain for shift, axis, gain in
           [(1, 0, 1.0), (-1, 0, 1.0), (1, 1, 1.0), (-1, 1, 1.0), (1, 0, 0.9), (-1, 1, 0.9),
            (1, 1, 1.1), (-1, 0, 1.1)]]
  return jnp.clip(jnp.stack(shots), -1, 1)


def _degrade(face, key):
  small = jax.image.resize(face, (RES // 2, RES // 2, 3), 'linear')
  blurry = jax.image.resize(small, (RES, RES, 3), 'linear')
  return jnp.clip(blurry + 0.2 * jax.random.normal(key, face.shape), -1, 1)


def _psnr(a, b):
  return float(-10 * jnp.log10(jnp.mean(((a - b) / 2) ** 2)))


def _train(system, opt_config, params, images, steps, seed):
  tx, _ = trainer.make_optimizer(opt_config, steps)
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    pick_key, loss_key = jax.random.split(key)
    batch = {'image': images[jax.random.choice(pick_key, len(images), (8,))]}
    grads = jax.grad(lambda p: system.loss_fn(p, batch, loss_key)[0])(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, jax.random.fold_in(jax.random.key(seed), i))
  return params


@pytest.fixture(scope='module')
def toy():
  config = _config()
  system = gen2res.make(config)
  faces = _faces()
  subject, others = faces[0], faces[1:]
  params = system.init(jax.random.key(0), {'image': others[:1]})
  base = _train(system, config.optimizer, params, others, 200, seed=1)
  constrained = _train(system, config.optimizer, base, _album(subject), 150, seed=2)
  unet = gen2res.adm.make_unet(config.model)
  schedule = schedules.make_schedule('linear', 1000)

  @jax.jit
  def restore(params, y, key):
    denoise_fn = lambda x, t: unet.apply({'params': params}, x, t)
    return restoration.restore(key, denoise_fn, schedule, y, start_step=K)

  degraded = _degrade(subject, jax.random.key(3))[None]
  keys = [jax.random.key(10 + i) for i in range(3)]  # several draws: a comparison of means
  mean_psnr = lambda p: np.mean([_psnr(restore(p, degraded, k)[0], subject) for k in keys])
  return dict(degraded=_psnr(degraded[0], subject), base=mean_psnr(base), constrained=mean_psnr(constrained))


def test_restoration_brings_the_clean_image_closer(toy):
  assert toy['constrained'] > toy['degraded'] + 1.0, toy


def test_constrained_prior_beats_unconstrained_at_the_same_k(toy):
  assert toy['constrained'] > toy['base'] + 0.5, toy  # measured: about 1 dB


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
