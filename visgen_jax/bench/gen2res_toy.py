"""The Gen2Res toy that tests/test_gen2res.py asserts on and `bench gen2res` measures.

Why its comparisons mean something: a "subject" is one built-in face; its personal album is
that face shifted by a pixel and re-exposed (other photos of the same person), without the
test photo itself (the face as it is). The base model is a tiny ADM (16², the `:tiny` config
with one level and no attention) trained briefly on the other faces, so it knows faces in
general but not the subject; the degradation (2x downsampling, blur, noise) destroys detail
that only knowledge of the subject brings back. A constrained prior (the base fine-tuned on
the album) must then restore the test photo better than the unconstrained base at the same K,
and better than leaving it degraded.
"""

import functools
import os

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import skimage.data

from visgen_jax.data import pipeline
from visgen_jax.diffusion import restoration, schedules
from visgen_jax.systems import adm, gen2res
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'gen2res_ffhq.py') + ':tiny'
RES = 16
OVERRIDES = (f'data.resolution={RES}', f'model.image_size={RES}', 'model.channel_mult=1',
             'model.attention_resolutions=', 'optimizer.learning_rate=2e-3')
BATCH = 8
BASE_STEPS = 200  # on the other faces
ALBUM_STEPS = 150  # fine-tuning the base on an album


def config():
  return config_lib.load_config(CONFIG, OVERRIDES)


def faces():
  """The subject (one built-in face) and the other 99 faces, at RES², in [-1, 1]."""
  faces = skimage.data.lfw_subset()[:100]
  small = jax.image.resize(jnp.asarray(faces, jnp.float32), (100, RES, RES), 'linear')
  faces = jnp.repeat(small[..., None] * 2 - 1, 3, axis=-1)
  return faces[0], faces[1:]


def personal_album(face):
  """The subject's other photos: shifted by a pixel and re-exposed, never the face as it is."""
  shots = [jnp.roll(face, shift, axis) * gain for shift, axis, gain in
           [(1, 0, 1.0), (-1, 0, 1.0), (1, 1, 1.0), (-1, 1, 1.0), (1, 0, 0.9), (-1, 1, 0.9),
            (1, 1, 1.1), (-1, 0, 1.1)]]
  return jnp.clip(jnp.stack(shots), -1, 1)


def degrade(face, key):
  """The test photo as the restorer sees it: downsampled 2x, blurred back up, noised."""
  small = jax.image.resize(face, (RES // 2, RES // 2, 3), 'linear')
  blurry = jax.image.resize(small, (RES, RES, 3), 'linear')
  return jnp.clip(blurry + 0.2 * jax.random.normal(key, face.shape), -1, 1)


def init(system, images):
  return system.init(jax.random.key(0), {'image': images[:1]})


def train(system, opt_config, params, images, steps, seed):
  """`steps` steps of the system's loss on batches of BATCH drawn from `images` (with replacement,
  so an album smaller than the batch trains too), the optimizer's schedule over `steps`."""
  tx, _ = trainer.make_optimizer(opt_config, steps)
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    pick_key, loss_key = jax.random.split(key)
    batch = {'image': images[jax.random.choice(pick_key, len(images), (BATCH,))]}
    grads = jax.grad(lambda p: system.loss_fn(p, batch, loss_key)[0])(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, jax.random.fold_in(jax.random.key(seed), i))
  return params


def restorer(config):
  """jit (params, y [B, RES, RES, 3], key, start_step, guidance_scale=0) -> restoration.restore's
  images: each of the batch diffused and denoised with its own noise."""
  unet = adm.make_unet(config.model)
  schedule = schedules.make_schedule(config.diffusion.noise_schedule, config.diffusion.num_timesteps)

  @functools.partial(jax.jit, static_argnames=('start_step', 'guidance_scale'))
  def restore(params, y, key, start_step, guidance_scale=0.0):
    denoise_fn = lambda x, t: unet.apply({'params': params}, x, t)
    return restoration.restore(key, denoise_fn, schedule, y, start_step=start_step,
                               guidance_scale=guidance_scale)

  return restore


def save_random_base(config, directory):
  """A base model of random weights for `config`'s model, saved as the parameter directory
  `python -m visgen_jax.convert` writes (an init_from source): what the command line's stages
  run on in the bench's timing and the command-line test."""
  params = jax.jit(gen2res.make(config).init)(jax.random.key(0), pipeline.example_batch(config.data, 1))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), params)
  checkpointer.wait_until_finished()
