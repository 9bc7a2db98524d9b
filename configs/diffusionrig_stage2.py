"""DiffusionRig stage 2: personalisation on one subject's album, from a stage-1 workdir
(--config.init_from=DIR), the encoder and its BatchNorm statistics frozen, lr 1e-5, batch 4,
5k steps. See configs/diffusionrig_stage1.py for the commands.
"""

import diffusionrig_stage1

from visgen_jax.train import config as config_lib


def get_config(arg=None):
  c = diffusionrig_stage1.get_config()
  stage2(c)
  return config_lib.variant(c, arg, __file__, tiny=tiny)


def stage2(c):
  c.total_steps = 5_000
  c.batch_size = 4
  c.ckpt_every = 1_000
  c.sample_every = 1_000
  c.optimizer.learning_rate = 1e-5
  c.frozen = ('^(encoder|batch_stats)/',)
  c.data.subjects = 'album'


def tiny(c):
  diffusionrig_stage1.tiny(c)
  stage2(c)
  c.total_steps = 2
  c.log_every = 1
  c.ckpt_every = 2
  c.sample_every = 0
