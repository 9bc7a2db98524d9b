"""MaskCLIP on COCO panoptic: ViT-L/14@336 (OpenAI weights), RMA at layers 6, 12, 18, 24,
AdamW 1e-4, weight decay 0.05, batch 8, 10k steps; only RMA trains.

  # CPU-sized first run: the 'tiny' CLIP (random weights) on the built-in shapes set:
  python -m visgen_jax.main --config=configs/maskclip_coco.py:tiny --workdir=/tmp/maskclip_tiny
  python -m visgen_jax.main --config=configs/maskclip_coco.py:tiny --workdir=/tmp/maskclip_tiny --mode=eval
  # Paper scale: convert COCO panoptic, bring OpenAI's ViT-L/14@336 checkpoint:
  python data_prep/build_segmentation_dataset.py --format=coco_panoptic --src=/data/coco --split=train \\
      --out=/data/coco_pan_train [--proposals=/data/proposals_train]
  python -m visgen_jax.main --config=configs/maskclip_coco.py --workdir=DIR \\
      --config.data.path=/data/coco_pan_train --config.model.clip_checkpoint=/ckpt/ViT-L-14-336px.pt
  ... --mode=eval --config.evals.seg.path=/data/coco_pan_val
  # Any vocabulary, one image and its proposals (.npz, see visgen_jax/data/segmentation/records.py):
  ... --mode=segment --config.classes="toy rabbit,real rabbit,background" \\
      --config.image=photo.jpg --config.proposals=photo.npz
"""

from visgen_jax.errors import UserError
from visgen_jax.systems import maskclip


def get_config(arg=None):
  c = maskclip.default_config()
  if arg == 'tiny':
    maskclip.tiny(c)
  elif arg:
    raise UserError(f'--config=configs/maskclip_coco.py:{arg}: unknown variant; allowed: tiny, or none for '
                    'paper scale.')
  return c
