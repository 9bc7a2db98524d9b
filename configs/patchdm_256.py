"""Patch-DM at 256² (FFHQ / LSUN church, bedroom): 4×4 patches of 64².

The public code trains these with classifier-free guidance (weight 0.5) and a
semantic encoder of the whole image trained jointly (model.code_source=encoder),
whose codes the latent DPM learns (raw, as all the public Patch-DM latents).

  python -m visgen_jax.main --config=configs/patchdm_256.py:tiny --workdir=/tmp/patchdm256_tiny
  python -m visgen_jax.main --config=configs/patchdm_256.py --workdir=DIR \\
      --config.data.name=folder --config.data.path=/data/ffhq256
"""

from visgen_jax.errors import UserError
from visgen_jax.systems import patchdm


def get_config(arg=None):
  c = patchdm.default_config((256, 256))
  c.data.name = 'sample_faces'
  c.sampler.guidance_scale = 0.5
  c.model.code_source = 'encoder'
  if arg == 'tiny':
    patchdm.tiny(c, (32, 32))
  elif arg:
    raise UserError(f'--config=configs/patchdm_256.py:{arg}: unknown variant; allowed: tiny, or none for paper scale.')
  return c
