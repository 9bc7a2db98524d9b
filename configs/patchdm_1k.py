"""Patch-DM at 1024×512 (the paper's nature landscapes): 8×16 patches of 64².

  # CPU-sized first run on the built-in sample photographs (32x64, 2x4 patches of 16²):
  python -m visgen_jax.main --config=configs/patchdm_1k.py:tiny --workdir=/tmp/patchdm_tiny
  python -m visgen_jax.main --config=configs/patchdm_1k.py:tiny --workdir=/tmp/patchdm_tiny --mode=sample \\
      --config.sample.size=64,128
  # Paper scale; with no dataset configured, the built-in photographs at 512x1024:
  python -m visgen_jax.main --config=configs/patchdm_1k.py --workdir=DIR \\
      [--config.data.name=folder --config.data.path=/data/nature1024]
  # The code table started from CLIP ViT-B/16 image embeddings (OpenAI's weights), as the paper:
  python -m visgen_jax.main --config=configs/patchdm_1k.py --workdir=DIR \\
      --config.codes.init=clip --config.codes.clip_checkpoint=/weights/ViT-B-16.pt
  # Or a semantic encoder trained jointly instead of the table:
  ... --config.codes.source=encoder
  # Any size from the same model (interpolated positions), beyond the trained grid, editing:
  ... --mode=sample --config.sample.size=1024,2048
  ... --mode=sample --config.sample.size=768,1280 --config.sample.positions=extend
  ... --mode=sample --config.sample.size=2048,4096 --config.sample.stream_rows=1  (memory ~ width)
  ... --mode=sample --config.sample.code_index=0,5,7,9  (table codes instead of latent-DPM codes)
  ... --mode=outpaint --config.sample.size=512,1024 --config.edit.input=centre.png
  ... --mode=inpaint --config.edit.input=photo.png --config.edit.mask=holes.png  (white = fill in)
  ... --mode=sdedit --config.edit.input=photo.png --config.edit.strength=0.6  (resized to sample.size)
"""

import patchdm_base

from visgen_jax.train import config as config_lib


def get_config(arg=None):
  return config_lib.variant(patchdm_base.config((512, 1024)), arg, __file__,
                            tiny=lambda c: patchdm_base.tiny(c, (32, 64)))
