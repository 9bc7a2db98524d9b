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

import ml_collections

from visgen_jax.data import segmentation as seg_data
from visgen_jax.segmentation import losses, postprocess
from visgen_jax.train import config as config_lib


def get_config(arg=None):
  """The paper's MaskCLIP (ViT-L/14@336, RMA at 6, 12, 18, 24) on COCO panoptic."""
  c = config_lib.base_config()
  c.system = 'maskclip'
  c.total_steps = 10_000
  c.batch_size = 8
  c.log_every = 50
  c.ckpt_every = 1000
  c.sample_every = 0
  c.optimizer.update(name='adamw', learning_rate=1e-4, weight_decay=0.05, ema_decay=0.0)
  c.frozen = ('^clip/',)  # CLIP stays frozen; only RMA's layers train
  c.sample.use_ema = False
  c.data = ml_collections.ConfigDict(dict(
      name='segmentation', path='', resolution=336, random_flip=True, scale_range=(1.0, 1.0),
      max_segments=100, max_proposals=100, proposals='auto', worker_count=0, prefetch=2))
  c.model = ml_collections.ConfigDict(dict(
      clip_preset='ViT-L-14-336-quickgelu', clip_checkpoint='', merges='', rma_layers=(6, 12, 18, 24),
      use_rma=True, attention_impl='xla', temperature=0.01, prompt_templates=('{}',), no_object_name='other',
      # Segment / eval without stored proposals: the proposal network's (systems/proposals.py).
      proposal_checkpoint='', proposal_resolution=1024))
  c.loss = ml_collections.ConfigDict(dict(
      class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=losses.NO_OBJECT_WEIGHT,
      num_points=losses.NUM_POINTS, oversample_ratio=losses.OVERSAMPLE_RATIO,
      importance_sample_ratio=losses.IMPORTANCE_SAMPLE_RATIO))
  c.inference = ml_collections.ConfigDict(dict(
      object_mask_threshold=postprocess.OBJECT_MASK_THRESHOLD,
      overlap_threshold=postprocess.OVERLAP_THRESHOLD, topk=postprocess.TOPK_PER_IMAGE,
      stuff_classes=''))
  c.classes = ''  # --mode=segment: the vocabulary, comma-separated
  c.image = ''
  c.proposals = ''
  # --mode=eval (and every eval_every steps): mIoU, PQ, mask AP on `path` ('' = data.path), its
  # first `max_images` images (0 = all).
  c.evals.seg = ml_collections.ConfigDict(dict(type='segmentation', path='', max_images=0))
  return config_lib.variant(c, arg, __file__, tiny=tiny)


def tiny(c):
  """CPU-sized: the 'tiny' CLIP (random weights) on the built-in shapes set at 64²."""
  c.total_steps = 20
  c.batch_size = 2
  c.log_every = 5
  c.ckpt_every = 10
  c.data.update(name=seg_data.SAMPLE_NAME, resolution=64, max_segments=8, max_proposals=8)
  c.model.update(clip_preset='tiny', rma_layers=(2, 4), proposal_resolution=64)
  c.loss.num_points = 256
  c.inference.topk = 10
