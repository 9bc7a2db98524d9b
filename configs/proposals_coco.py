"""MaskCLIP's mask proposal network: class-agnostic Mask2Former (ResNet-50, frozen BatchNorm,
6-layer deformable pixel decoder, 9-layer masked-attention decoder, 100 queries) on COCO
panoptic, Mask2Former's recipe: 1024² large-scale-jitter crops (scale 0.1–2.0), AdamW 1e-4,
weight decay 0.05, backbone lr ×0.1, full-model gradient clipping 0.01, batch 16, 368,750 steps
(50 epochs), lr decaying linearly to 0 (Mask2Former's poly 0.9 schedule is not offered; linear
is the closest). Not reproduced: Mask2Former's zero weight decay on norms and embeddings.

  # CPU-sized first run on the built-in shapes set, then its proposals:
  python -m visgen_jax.main --config=configs/proposals_coco.py:tiny --workdir=/tmp/proposals_tiny
  python -m visgen_jax.main --config=configs/proposals_coco.py:tiny --workdir=/tmp/proposals_tiny \\
      --mode=propose
  # Paper scale, from torchvision's ImageNet ResNet-50:
  python -m visgen_jax.main --config=configs/proposals_coco.py --workdir=DIR \\
      --config.data.path=/data/coco_pan_train --config.init_from=resnet50-0676ba61.pth
  ... --mode=propose --config.data.path=/data/coco_pan_val   # → DIR/proposals/coco_pan_val-step<N>/
  ... --mode=eval --config.evals.recall.path=/data/coco_pan_val  # class-agnostic recall, AR
"""

import ml_collections

from visgen_jax.data import segmentation as seg_data
from visgen_jax.models.resnet import FROZEN_NORMS
from visgen_jax.segmentation import losses
from visgen_jax.train import config as config_lib


def get_config(arg=None):
  """Mask2Former R50, class-agnostic, on COCO panoptic (data.path: a built dataset)."""
  c = config_lib.base_config()
  c.system = 'proposals'
  c.total_steps = 368_750
  c.batch_size = 16
  c.log_every = 50
  c.ckpt_every = 5000
  c.sample_every = 0
  c.optimizer.update(name='adamw', learning_rate=1e-4, weight_decay=0.05, schedule='linear',
                     grad_clip=0.01, ema_decay=0.0, lr_multipliers=(('^backbone/', 0.1),))
  c.sample.use_ema = False
  # detectron2's FrozenBN: the backbone's norms keep the ImageNet statistics they start from.
  c.frozen = (FROZEN_NORMS,)
  c.data = ml_collections.ConfigDict(dict(
      name='segmentation', path='', resolution=1024, random_flip=True, scale_range=(0.1, 2.0),
      max_segments=100, max_proposals=1, proposals='gt', worker_count=0, prefetch=2))
  c.model = ml_collections.ConfigDict(dict(
      num_classes=1, num_queries=100, hidden_dim=256, mask_dim=256, num_heads=8, ffn_dim=2048,
      dec_layers=9, enc_layers=6, enc_ffn_dim=1024, enc_points=4, backbone_depth=50, backbone_width=64))
  c.loss = ml_collections.ConfigDict(dict(
      class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=losses.NO_OBJECT_WEIGHT,
      num_points=losses.NUM_POINTS, oversample_ratio=losses.OVERSAMPLE_RATIO,
      importance_sample_ratio=losses.IMPORTANCE_SAMPLE_RATIO))
  # --mode=propose: per image the `topk` masks of highest object score above `score_threshold`,
  # as bool masks (float16 logits with logits=True), into `out` ('' = WORKDIR/proposals/...).
  c.propose = ml_collections.ConfigDict(dict(out='', topk=100, score_threshold=0.0, logits=False))
  # --mode=eval (and every eval_every steps): recall of those proposals on `path` ('' = data.path),
  # its first `max_images` (0 = all); visgen_jax/eval/proposal_recall.py.
  c.evals.recall = ml_collections.ConfigDict(dict(type='proposal_recall', path='', max_images=0))
  return config_lib.variant(c, arg, __file__, tiny=tiny)


def tiny(c):
  """CPU-sized: a narrow network (8-channel stem, 32 hidden, 3 decoder layers, 10 queries) on the
  built-in shapes set at 64², from random weights (so its norms train: nothing to freeze them at)."""
  c.total_steps = 20
  c.batch_size = 2
  c.log_every = 5
  c.ckpt_every = 10
  c.frozen = ()
  c.data.update(name=seg_data.SAMPLE_NAME, resolution=64, scale_range=(1.0, 1.0), max_segments=8)
  c.model.update(num_queries=10, hidden_dim=32, mask_dim=32, num_heads=2, ffn_dim=64, dec_layers=3,
                 enc_layers=1, enc_ffn_dim=64, enc_points=2, backbone_width=8)
  c.loss.num_points = 256
  c.propose.topk = 10
