"""ADM (guided-diffusion UNet) on FFHQ 256²: the base model of DiffusionRig and Gen2Res.

  # CPU-sized first run on the built-in sample faces:
  python -m visgen_jax.main --config=configs/adm_ffhq256.py:tiny --workdir=/tmp/adm_tiny
  python -m visgen_jax.main --config=configs/adm_ffhq256.py:tiny --workdir=/tmp/adm_tiny --mode=sample
  # Edits on the latest checkpoint (WORKDIR/<mode>/*.png):
  ... --mode=sdedit --config.edit.input=face.png [--config.edit.strength=0.5]
  ... --mode=inpaint --config.edit.input=face.png --config.edit.mask=holes.png  (white = fill in)
  ... --mode=outpaint --config.edit.input=small_face.png
  # Paper scale, on a dataset built with data_prep/:
  python -m visgen_jax.main --config=configs/adm_ffhq256.py --workdir=DIR --config.data.path=/data/ffhq256
"""

import ml_collections

from visgen_jax.diffusion import editing
from visgen_jax.train import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.system = 'adm'
  # DiffusionRig stage 1: Adam 1e-4, batch 256, 50k steps, EMA 0.9999.
  c.total_steps = 50_000
  c.batch_size = 256
  c.log_every = 100
  c.ckpt_every = 5_000
  c.sample_every = 5_000
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-4
  c.optimizer.grad_clip = 0.0  # guided_diffusion does not clip
  c.data.name = 'folder'
  c.data.resolution = 256

  c.model = ml_collections.ConfigDict(dict(
      image_size=256, in_channels=3, model_channels=128, out_channels=6, num_res_blocks=2,
      attention_resolutions=(16,), dropout=0.1, channel_mult=(1, 1, 2, 2, 4, 4), num_classes=0,
      num_heads=1, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True,
      resblock_updown=True, use_new_attention_order=False, code_dim=0,
      remat=False))  # True: recompute each ResBlock in the backward pass (less memory, more time)
  c.diffusion = ml_collections.ConfigDict(dict(
      noise_schedule='linear', num_timesteps=1000, learn_sigma=True,
      p2_gamma=1.0, p2_k=1.0))  # P2 weighting (Choi et al.), as DiffusionRig trains
  c.sampler = ml_collections.ConfigDict(dict(name='ddim', steps=50, eta=0.0, guidance_scale=0.0))
  c.sample.num = 16
  c.edit = editing.edit_config()  # --mode=inpaint|outpaint|sdedit
  return config_lib.variant(c, arg, __file__, tiny=tiny)


def tiny(c):
  """CPU-sized, on the built-in sample faces at 32²."""
  c.total_steps = 20
  c.batch_size = 8
  c.log_every = 5
  c.ckpt_every = 10
  c.sample_every = 20
  c.optimizer.ema_decay = 0.99
  c.data.name = 'sample_faces'
  c.data.resolution = 32
  c.model.update(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1)
  c.sampler.steps = 10
  c.sample.num = 4
