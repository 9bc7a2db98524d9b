"""MaskCLIP recipe end to end on the tiny config: train (evaluating as it goes), --mode=eval
(on one and on two processes, against the metrics fed directly), --mode=segment, the metrics
wiring, and bad input (one sentence, exit 2, nothing written)."""

import itertools
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_distributed, run_main
from visgen_jax.data import segmentation as seg_data
from visgen_jax.errors import UserError
from visgen_jax.eval import segmentation as seg_metrics
from visgen_jax.segmentation import postprocess, results
from visgen_jax.systems import get_system, maskclip
from visgen_jax.train import checkpoint
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

TINY = 'configs/maskclip_coco.py:tiny'
CLASSES = 'circle,square,triangle,sky,grass'
EVAL_IMAGES = 3
EVAL = f'--config.evals.seg.max_images={EVAL_IMAGES}'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny MaskCLIP trained for 2 steps (evaluated at step 2), and one sample image with its
  proposals."""
  root = tmp_path_factory.mktemp('maskclip')
  workdir = str(root / 'run')
  run_main(f'--config={TINY}', f'--workdir={workdir}', '--config.total_steps=2', '--config.eval_every=2',
           EVAL, check=True)
  image, ids, segments = seg_data.sample_example(3)
  Image.fromarray(image).save(root / 'shapes.png')
  seg_data.save_proposals(str(root / 'shapes.npz'), np.stack([ids == s[0] for s in segments]))
  return root, workdir


def test_eval_segment_zero_proposals_and_a_cli_mistake(trained):
  root, workdir = trained
  result = run_main(f'--config={TINY}', f'--workdir={workdir}', '--mode=eval', EVAL, check=True)
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed['step'] == 2 and printed['seg/images'] == EVAL_IMAGES
  for key in ('semantic/miou', 'panoptic/pq', 'panoptic/pq_th', 'panoptic/pq_st', 'instance/ap'):
    assert 0.0 <= printed[f'seg/{key}'] <= 1.0
  with open(os.path.join(workdir, 'eval', 'step_0000002.json')) as f:
    assert json.load(f) == printed
  # Training evaluated the same parameters at step 2 (eval_every=2).
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f if 'seg/images' in line]
  assert logged == [printed]
  assert {f'seg/{k}': v for k, v in metrics_fed_directly(workdir).items()} == {
      k: v for k, v in printed.items() if k != 'step'}
  _check_two_processes_print_the_same(workdir, printed)

  run_main(f'--config={TINY}', f'--workdir={workdir}', '--mode=segment', f'--config.classes={CLASSES}',
           f'--config.image={root / "shapes.png"}', f'--config.proposals={root / "shapes.npz"}', check=True)
  out = os.path.join(workdir, 'segment', 'shapes')
  assert sorted(os.listdir(out)) == ['masks', 'overlay.png', 'panoptic.json', 'panoptic.png']
  with open(os.path.join(out, 'panoptic.json')) as f:
    panoptic = json.load(f)
  assert [c['name'] for c in panoptic['categories']] == CLASSES.split(',')
  ids = seg_data.rgb_to_ids(np.asarray(Image.open(os.path.join(out, 'panoptic.png'))))
  assert ids.shape == (96, 128)
  assert sorted(s['id'] for s in panoptic['annotations'][0]['segments_info']) == sorted(set(np.unique(ids)) - {0})
  assert Image.open(os.path.join(out, 'overlay.png')).size == (128, 96)
  written = {os.path.splitext(n)[0] for n in os.listdir(os.path.join(out, 'masks'))}
  assert written and written <= set(CLASSES.split(','))
  # In the same test: the trained model is built once per run (and once per xdist worker).
  _check_zero_proposals_give_a_defined_empty_result(root, workdir)
  _check_cli_mistake_exits_2_with_one_sentence_and_writes_nothing(root, workdir)


def metrics_fed_directly(workdir):
  """The first EVAL_IMAGES images of the tiny set through the trained model, post-processed and
  fed to the metric classes here, not by the evaluator."""
  config = config_lib.load_config(TINY)
  _, info = seg_data.make_segmentation_source(config.data)
  params = checkpoint.restore_latest_state(os.path.join(workdir, 'checkpoints'))['params']
  predict = get_system(config).segmenter(params, info.class_names)
  is_thing = np.array([bool(c['isthing']) for c in info.categories])
  options = config.inference
  semantic = seg_metrics.SemanticMetric(len(is_thing), ignore_label=-1)
  panoptic = seg_metrics.PanopticMetric([dict(c, id=i) for i, c in enumerate(info.categories)])
  instance = seg_metrics.InstanceMetric(len(is_thing))
  data = seg_data.make_segmentation_iterator(config.data, local_batch_size=1, train=False)
  for batch in itertools.islice(data, EVAL_IMAGES):
    example = {k: v[0] for k, v in batch.items()}
    logits, masks = predict(example)
    h, w = example['valid_hw']
    gt_masks = example['target_masks'][example['target_valid']][:, :h, :w]
    gt_classes = example['target_classes'][example['target_valid']]
    gt_semantic = np.full((h, w), -1)
    gt_panoptic = np.zeros((h, w), int)
    for k, (mask, label) in enumerate(zip(gt_masks, gt_classes)):
      gt_semantic[mask], gt_panoptic[mask] = label, k + 1
    semantic.update(postprocess.semantic_inference(logits, masks).argmax(0), gt_semantic)
    panoptic.update(*postprocess.panoptic_inference(logits, masks, is_thing, options.object_mask_threshold,
                                                    options.overlap_threshold),
                    gt_panoptic, [{'id': k + 1, 'category_id': int(c)} for k, c in enumerate(gt_classes)])
    thing = is_thing[gt_classes]
    instance.update(*postprocess.instance_inference(logits, masks, options.topk, is_thing),
                    gt_masks[thing], gt_classes[thing])
  data.close()
  return {'images': EVAL_IMAGES, **{f'semantic/{k}': v for k, v in semantic.compute().items()},
          **{f'panoptic/{k}': v for k, v in panoptic.compute().items()},
          **{f'instance/{k}': v for k, v in instance.compute().items()}}


def _check_two_processes_print_the_same(workdir, printed):
  """Each of two processes evaluates its half of the images; the reduced results are the same."""
  outputs = run_distributed(f'--config={TINY}', f'--workdir={workdir}', '--mode=eval', EVAL)
  json_lines = [[line for line in out.splitlines() if line.startswith('{')] for out, _ in outputs]
  assert json_lines[1] == []  # process 0 alone prints
  assert json.loads(json_lines[0][-1]) == printed


def _segment(workdir, **overrides):
  config = config_lib.load_config(TINY, [f'{k}={v}' for k, v in overrides.items()])
  trainer.run_command(config, workdir, 'segment')


@pytest.mark.parametrize('overrides, message', [
    (dict(classes=''), 'comma-separated list'),
    (dict(classes='circle,,sky'), 'none empty'),
    (dict(classes='sky,circle,sky'), 'sky more than once'),
    (dict(classes='sky', **{'inference.stuff_classes': 'grass'}), 'grass, which is not in'),
    (dict(classes=CLASSES, image='missing.png'), 'no such file'),
    (dict(classes=CLASSES, image='corrupt.png'), 'not a readable image'),
    (dict(classes=CLASSES, image='shapes.png', proposals='small.npz'), 'size'),
    (dict(classes=CLASSES, image='shapes.png', proposals=''), 'needs --config.proposals'),
])
def test_segment_inputs_refuse_bad_input(tmp_path, overrides, message):
  image, _, _ = seg_data.sample_example(0)
  Image.fromarray(image).save(tmp_path / 'shapes.png')
  (tmp_path / 'corrupt.png').write_bytes(b'\x89PNG not really')
  seg_data.save_proposals(str(tmp_path / 'small.npz'), np.ones((2, 10, 10), bool))
  overrides = {k: (str(tmp_path / v) if k in ('image', 'proposals') and v else v) for k, v in overrides.items()}
  config = config_lib.load_config(TINY, [f'{k}={v}' for k, v in overrides.items()])
  with pytest.raises(UserError, match=message):
    maskclip.segment_inputs(config)


def _check_cli_mistake_exits_2_with_one_sentence_and_writes_nothing(root, workdir):
  before = sorted(os.listdir(workdir))
  result = run_main(f'--config={TINY}', f'--workdir={workdir}', '--mode=segment',
                    '--config.classes=sky,circle,sky', f'--config.image={root / "shapes.png"}',
                    f'--config.proposals={root / "shapes.npz"}')
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0 and 'more than once' in result.stderr
  assert sorted(os.listdir(workdir)) == before


def _check_zero_proposals_give_a_defined_empty_result(root, workdir):
  seg_data.save_proposals(str(root / 'none.npz'), np.zeros((0, 96, 128), bool))
  Image.open(root / 'shapes.png').save(root / 'empty.png')
  _segment(workdir, classes=CLASSES, image=str(root / 'empty.png'), proposals=str(root / 'none.npz'))
  out = os.path.join(workdir, 'segment', 'empty')
  np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, 'overlay.png'))),
                                np.asarray(Image.open(root / 'empty.png')))
  with open(os.path.join(out, 'panoptic.json')) as f:
    assert json.load(f)['annotations'][0]['segments_info'] == []
  assert os.listdir(os.path.join(out, 'masks')) == []


def test_perfect_predictions_score_one_on_every_metric():
  """The eval wiring: ground truth fed back as predictions must give mIoU = PQ = AP = 1."""
  _, ids, segments = seg_data.sample_example(5)
  gt_masks = np.stack([ids == s[0] for s in segments])
  gt_classes = np.array([s[1] for s in segments])
  categories = seg_data.SAMPLE_CATEGORIES
  num_classes = len(categories)
  is_thing = np.array([bool(c['isthing']) for c in categories])
  logits = np.full((len(segments), num_classes + 1), -20.0, np.float32)
  logits[np.arange(len(segments)), gt_classes] = 20.0
  masks = np.where(gt_masks, 10.0, -10.0).astype(np.float32)
  options = config_lib.load_config(TINY).inference
  perfect = seg_metrics.SegmentationMetrics(categories, options)
  perfect.add(logits, masks, gt_masks, gt_classes, image_id=0)
  result = perfect.compute()
  assert result['semantic/pixel_acc'] == 1.0
  assert result['panoptic/pq'] == pytest.approx(1.0)
  if is_thing[gt_classes].any():
    assert result['instance/ap'] == pytest.approx(1.0)
  # And a wrong class everywhere scores zero PQ.
  wrong = seg_metrics.SegmentationMetrics(categories, options)
  wrong_logits = np.full_like(logits, -20.0)
  wrong_logits[np.arange(len(segments)), (gt_classes + 1) % num_classes] = 20.0
  wrong.add(wrong_logits, masks, gt_masks, gt_classes, image_id=0)
  assert wrong.compute()['panoptic/pq'] == 0.0


def test_vocabulary_parsing():
  assert maskclip.parse_classes(' toy rabbit , real rabbit,background', 'c') == [
      'toy rabbit', 'real rabbit', 'background']
  with pytest.raises(UserError, match='more than once'):
    maskclip.parse_classes('a,b,a', 'c')


def test_segment_results_are_written_by_process_zero_only(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  results.write_segmentation(str(tmp_path), 'shapes.png', np.zeros((4, 4, 3), np.uint8), ['sky'], np.array([False]),
                             np.zeros((0, 2)), np.zeros((0, 4, 4)), None)
  assert not os.listdir(tmp_path)
