"""DiffusionRig stage 1: generic priors from many subjects (Adam 1e-4, batch 256, 50k steps,
clip 1.0, no EMA in the original: ema_decay 0 keeps no EMA copy; set optimizer.ema_decay > 0
and sample.use_ema to use one).

  python -m visgen_jax.main --config=configs/diffusionrig_stage1.py:tiny --workdir=/tmp/rig1
  # then stage 2 (configs/diffusionrig_stage2.py) and edits:
  python -m visgen_jax.main --config=configs/diffusionrig_stage2.py:tiny --workdir=/tmp/rig2 \
      --config.init_from=/tmp/rig1
  python -m visgen_jax.main --config=configs/diffusionrig_stage2.py:tiny --workdir=/tmp/rig2 --mode=edit \
      --config.init_from=/tmp/rig1 \
      --config.edit.input=face.png --config.edit.rotate_degrees=30,-30 --config.edit.code_from=other.png
  # more edits (see diffusionrig.edit_config): edit.light=L.npy, edit.light_from=, edit.buffers_from=,
  # edit.model_from=<another person's stage-2 workdir> (its UNet, the input's buffers and code);
  # edit.invert=True starts every edit from the input's DDIM inversion instead of a shared random noise.

Data: the built-in synthetic subjects (data.name=rig_subjects) with subject data.album_subject
held out for stage 2.
"""

import ml_collections

import adm_ffhq256
from visgen_jax.systems import diffusionrig
from visgen_jax.train import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.system = 'diffusionrig'
  c.total_steps = 50_000
  c.batch_size = 256
  c.log_every = 100
  c.ckpt_every = 5_000
  c.sample_every = 5_000
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-4
  c.optimizer.grad_clip = 1.0
  c.optimizer.ema_decay = 0.0  # no EMA (the original's choice)
  c.sample.use_ema = False
  c.sample.num = 8
  c.data = ml_collections.ConfigDict(dict(name='rig_subjects', resolution=256, subjects='others', album_subject=0,
                                          path='', random_flip=True, worker_count=0, prefetch=2))
  # ADM's 256² UNet (configs/adm_ffhq256.py) with the buffers concatenated, ε only, and the 64-d code.
  c.model = adm_ffhq256.get_config().model
  c.model.update(in_channels=diffusionrig.IN_CHANNELS['buffers'], out_channels=3, code_dim=64)
  c.model.condition = 'buffers'  # or 'vector' (the ablation): with in_channels=3 and data.random_flip=False
  c.diffusion = ml_collections.ConfigDict(dict(noise_schedule='linear', num_timesteps=1000, learn_sigma=False,
                                               p2_gamma=1.0, p2_k=1.0))
  c.sampler = ml_collections.ConfigDict(dict(name='ddim', steps=20, eta=0.0, guidance_scale=0.0))
  c.edit = diffusionrig.edit_config()
  return config_lib.variant(c, arg, __file__, tiny=tiny)


def tiny(c):
  """CPU-sized, at 32²."""
  c.total_steps = 4
  c.batch_size = 8
  c.log_every = 2
  c.ckpt_every = 4
  c.sample_every = 0
  c.sample.num = 4
  c.data.resolution = 32
  c.model.update(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1)
  c.sampler.steps = 5
