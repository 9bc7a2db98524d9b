"""The evaluator registry: settings checked when built, the data split over processes and the
results reduced, prefixed result keys, and the config keys eval_every / evals."""

import ml_collections
import numpy as np
import pytest

from visgen_jax import eval as eval_lib
from visgen_jax.data import segmentation as seg_data
from visgen_jax.errors import UserError
from visgen_jax.eval import proposal_recall
from visgen_jax.eval import segmentation as seg_eval
from visgen_jax.systems import System
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

MASKCLIP = 'configs/maskclip_coco.py:tiny'
ADM = 'configs/adm_ffhq256.py:tiny'


def fake_segmenter(params, names):
  """Predictions that depend only on the example: its proposals, random classes per image."""
  del params

  def predict(example):
    valid = example['proposal_valid']
    h, w = example['valid_hw']
    logits = np.random.default_rng(int(example['index'])).normal(size=(valid.sum(), len(names) + 1))
    return logits.astype(np.float32), example['proposals'][valid][:, :h, :w]

  return predict


FAKE_SYSTEM = System(init=None, loss_fn=None, segmenter=fake_segmenter)


def test_shards_of_two_processes_merged_equal_one_process():
  config = config_lib.load_config(MASKCLIP)
  _, info = seg_data.make_segmentation_source(config.data)
  predict = fake_segmenter(None, info.class_names)

  def shard(index, count):
    return seg_eval.evaluate_shard(predict, config.data, info.categories, config.inference, limit=9,
                                   process_index=index, process_count=count)

  first, second = shard(0, 2), shard(1, 2)
  assert (first.panoptic.num_images, second.panoptic.num_images) == (5, 4)
  first.merge(second)
  one = shard(0, 1).compute()
  assert first.compute() == one and one['images'] == 9
  # Through the cross-process reduction (on one process: a pickled round trip).
  assert eval_lib.merge_over_processes(shard(0, 1)).compute() == one


def test_evaluators_are_built_from_config_evals_and_prefix_their_results():
  config = config_lib.load_config(MASKCLIP, ['evals.seg.max_images=3'])
  evaluators = eval_lib.build_evaluators(config, FAKE_SYSTEM)
  assert list(evaluators) == ['seg']
  results = evaluators['seg'](params={}, step=7)
  assert results['seg/images'] == 3.0
  assert {'seg/semantic/miou', 'seg/panoptic/pq', 'seg/instance/ap'} <= set(results)
  assert all(isinstance(v, float) for v in results.values())


@pytest.mark.parametrize('change, system, message', [
    (dict(type='fidd'), FAKE_SYSTEM, r"config.evals.seg.type='fidd' is not an evaluator type; allowed: fid, proposal_recall, segmentation"),
    (dict(max_image=3), FAKE_SYSTEM, r'config.evals.seg.max_image is not a setting .*max_images'),
    (dict(max_images=-1), FAKE_SYSTEM, r'config.evals.seg.max_images=-1 is not allowed'),
    (dict(path='/nonexistent/coco'), FAKE_SYSTEM, r"config.evals.seg.path='/nonexistent/coco' is not a segmentation dataset"),
    ({}, System(init=None, loss_fn=None), r"config.evals.seg.type=segmentation needs a system that segments"),
    (dict(type='proposal_recall'), FAKE_SYSTEM, r"config.evals.seg.type=proposal_recall needs a system that proposes masks"),
])
def test_settings_are_checked_when_built(change, system, message):
  config = config_lib.load_config(MASKCLIP)
  config.unlock()
  config.evals.seg.update(change)
  with pytest.raises(UserError, match=message):
    eval_lib.build_evaluators(config, system)


def test_best_iou_and_recall_thresholds():
  segments = np.zeros((2, 4, 4), bool)
  segments[0, :2] = True  # top half (8 pixels)
  segments[1, 3, 3] = True  # one pixel
  proposals = np.zeros((2, 4, 4), bool)
  proposals[0, :1] = True  # top row: IoU 4/8 with the top half
  proposals[1, :3] = True  # top three rows: IoU 8/12
  np.testing.assert_allclose(proposal_recall.best_iou(proposals, segments), [8 / 12, 0.0])
  np.testing.assert_array_equal(proposal_recall.best_iou(proposals[:0], segments), [0.0, 0.0])
  recall = proposal_recall.Recall()
  recall.update(proposals, segments, [True, False])
  recall.update(segments[:1], segments[:1], [True])  # an exact match
  # Best IoUs 2/3, 0, 1: thresholds 0.5, 0.55, 0.6, 0.65 pass 2/3; AR = (4·2 + 6·1) / 30.
  assert recall.compute() == {'recall_50': 2 / 3, 'recall_75': 1 / 3, 'average_recall': 14 / 30,
                              'average_recall_things': 14 / 20, 'average_recall_stuff': 0.0,
                              'segments': 3, 'images': 2}


def test_an_instance_that_is_not_a_group_of_settings():
  config = config_lib.load_config(MASKCLIP)
  config.unlock()
  config.evals = ml_collections.ConfigDict({'seg': 'segmentation'})
  with pytest.raises(UserError, match='config.evals.seg=.* must be a group of settings'):
    eval_lib.build_evaluators(config, FAKE_SYSTEM)


def test_eval_mode_without_evaluators_and_eval_every_without_evaluators(tmp_path):
  config = config_lib.load_config(ADM)
  with pytest.raises(UserError, match=r'--mode=eval needs evaluators and config.evals is empty.*segmentation'):
    trainer.run_command(config, str(tmp_path), 'eval')
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(UserError, match=r'config.eval_every=5 is not allowed: config.evals is empty'):
    config_lib.validate(config_lib.load_config(ADM, ['eval_every=5']))
  with pytest.raises(UserError, match=r'config.eval_every=-1 is not allowed'):
    config_lib.validate(config_lib.load_config(MASKCLIP, ['eval_every=-1']))
