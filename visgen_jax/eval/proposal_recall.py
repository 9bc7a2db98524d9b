"""The 'proposal_recall' evaluator: class-agnostic recall of a mask proposal network.

For each ground-truth segment of a segmentation dataset (crowd regions left out, as COCO's
proposal recall leaves them out), the best IoU any of the image's proposals reaches (the top
config.propose.topk by object score, thresholded at logit 0 at the image's own size). Results:

  recall_50, recall_75   fraction of segments with best IoU ≥ 0.5 / ≥ 0.75
  average_recall         mean over the IoU thresholds 0.5, 0.55, …, 0.95 (COCO's AR)
  average_recall_things / _stuff   the same over thing / stuff segments
  segments, images       how many were counted
"""

import jax
import numpy as np
from tqdm import tqdm

from visgen_jax.data.segmentation import records
from visgen_jax.errors import UserError
from visgen_jax.eval import merge_over_processes, process_local, register
from visgen_jax.eval.segmentation import dataset

THRESHOLDS = np.linspace(0.5, 0.95, 10)


def best_iou(proposal_masks, segment_masks) -> np.ndarray:
  """float [G]: the highest IoU of any proposal [K, H, W] with each segment [G, H, W] (0 if K = 0)."""
  if len(proposal_masks) == 0:
    return np.zeros(len(segment_masks))
  p = proposal_masks.reshape(len(proposal_masks), -1).astype(np.float32)
  g = segment_masks.reshape(len(segment_masks), -1).astype(np.float32)
  intersection = g @ p.T
  union = g.sum(1)[:, None] + p.sum(1)[None] - intersection
  return (intersection / np.maximum(union, 1)).max(1)


class Recall:
  """Best IoUs of segments, fed one image at a time; `merge` across processes, `compute`."""

  def __init__(self):
    self.ious, self.is_thing, self.images = [], [], 0

  def update(self, proposal_masks, segment_masks, is_thing):
    self.ious.append(best_iou(proposal_masks, segment_masks))
    self.is_thing.append(np.asarray(is_thing, bool))
    self.images += 1

  def merge(self, other: 'Recall'):
    self.ious += other.ious
    self.is_thing += other.is_thing
    self.images += other.images

  def compute(self) -> dict:
    ious = np.concatenate([np.zeros(0), *self.ious])
    is_thing = np.concatenate([np.zeros(0, bool), *self.is_thing])

    def average_recall(selected):
      return float((ious[selected, None] >= THRESHOLDS).mean()) if selected.any() else float('nan')

    return {'recall_50': float(np.mean(ious >= 0.5)), 'recall_75': float(np.mean(ious >= 0.75)),
            'average_recall': average_recall(np.ones_like(is_thing)),
            'average_recall_things': average_recall(is_thing),
            'average_recall_stuff': average_recall(~is_thing),
            'segments': len(ious), 'images': self.images}


def recall_shard(propose, source, categories, limit, process_index, process_count) -> Recall:
  """Recall of `propose` (systems.proposals.make_proposer's) on this process's images among the
  first `limit` of `source` (records of data/segmentation; order process_index, + process_count …)."""
  is_thing_class = np.array([bool(c['isthing']) for c in categories])
  recall = Recall()
  mine = range(process_index, limit, process_count)
  for i in tqdm(mine, desc='recall', unit='image', disable=process_index != 0, leave=False):
    example = records.decode_example(source[i])
    counted = ~example['segment_iscrowd']
    segments = example['ids'][None] == example['segment_ids'][counted][:, None, None]
    masks, _ = propose(example['image'], f'record {i} ({example["image_id"]})')
    recall.update(masks > 0, segments, is_thing_class[example['segment_classes'][counted]])
  return recall


@register('proposal_recall', path='', max_images=0)
def build_proposal_recall(config, settings, system, where):
  """Class-agnostic recall of `system.proposer` on a segmentation dataset: settings.path
  ('' = config.data's dataset), its first settings.max_images images (0 = all)."""
  if system.proposer is None:
    raise UserError(f'{where}.type=proposal_recall needs a system that proposes masks; '
                    f'config.system={config.system!r} does not.')
  _, source, info, limit = dataset(config, settings, where)

  def evaluate(params, step):
    del step  # inference is deterministic
    propose = system.proposer(process_local(params))
    shard = recall_shard(propose, source, info.categories, limit, jax.process_index(), jax.process_count())
    return merge_over_processes(shard).compute()

  return evaluate
