"""Patch-DM at 256² (FFHQ / LSUN church, bedroom): 4×4 patches of 64².

The public code trains these with classifier-free guidance (weight 0.5) and a
semantic encoder of the whole image trained jointly (codes.source=encoder),
whose codes the latent DPM learns (raw, as all the public Patch-DM latents).

  python -m visgen_jax.main --config=configs/patchdm_256.py:tiny --workdir=/tmp/patchdm256_tiny
  python -m visgen_jax.main --config=configs/patchdm_256.py --workdir=DIR \\
      --config.data.name=folder --config.data.path=/data/ffhq256
"""

import patchdm_base

from visgen_jax.train import config as config_lib


def get_config(arg=None):
  c = patchdm_base.config((256, 256))
  c.data.name = 'sample_faces'
  c.sampler.guidance_scale = 0.5
  c.codes.source = 'encoder'
  return config_lib.variant(c, arg, __file__, tiny=lambda c: patchdm_base.tiny(c, (32, 32)))
