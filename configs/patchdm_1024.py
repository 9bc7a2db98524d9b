"""Patch-DM at 1024² (LHQ / FFHQ 1024): 16×16 patches of 64².

  python -m visgen_jax.main --config=configs/patchdm_1024.py:tiny --workdir=/tmp/patchdm1024_tiny
  python -m visgen_jax.main --config=configs/patchdm_1024.py --workdir=DIR \\
      --config.data.name=folder --config.data.path=/data/lhq1024 \\
      [--config.model.code_init=clip --config.model.clip_checkpoint=/weights/ViT-B-16.pt]
"""

from visgen_jax.errors import UserError
from visgen_jax.systems import patchdm


def get_config(arg=None):
  c = patchdm.default_config((1024, 1024))
  if arg == 'tiny':
    patchdm.tiny(c, (48, 48))
  elif arg:
    raise UserError(f'--config=configs/patchdm_1024.py:{arg}: unknown variant; allowed: tiny, or none for paper scale.')
  return c
