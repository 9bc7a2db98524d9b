"""Patch-DM at 1024² (LHQ / FFHQ 1024): 16×16 patches of 64².

  python -m visgen_jax.main --config=configs/patchdm_1024.py:tiny --workdir=/tmp/patchdm1024_tiny
  python -m visgen_jax.main --config=configs/patchdm_1024.py --workdir=DIR \\
      --config.data.name=folder --config.data.path=/data/lhq1024 \\
      [--config.codes.init=clip --config.codes.clip_checkpoint=/weights/ViT-B-16.pt]
"""

import patchdm_base

from visgen_jax.train import config as config_lib


def get_config(arg=None):
  return config_lib.variant(patchdm_base.config((1024, 1024)), arg, __file__,
                            tiny=lambda c: patchdm_base.tiny(c, (48, 48)))
