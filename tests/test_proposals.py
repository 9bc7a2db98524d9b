"""The proposals recipe on the tiny config: training steps through the trainer, --mode=propose
writing proposals a MaskCLIP dataset can be built with, MaskCLIP --mode=segment without
proposals (the proposal network runs first), the detectron2 / torchvision converter, per-group
learning rates, and bad input (one sentence, exit 2, nothing written)."""

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from tests.helpers import random_params, run_main
from visgen_jax.bench import oracles
from visgen_jax.convert import mask2former as m2f_convert
from visgen_jax.convert import pytorch
from visgen_jax.data import segmentation as seg_data
from visgen_jax.data.segmentation import sample as seg_sample
from visgen_jax.errors import UserError
from visgen_jax.eval import proposal_recall
from visgen_jax.models.mask2former import Mask2Former
from visgen_jax.systems import proposals
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer, weights

TINY = 'configs/proposals_coco.py:tiny'
MASKCLIP_TINY = 'configs/maskclip_coco.py:tiny'
CLASSES = 'circle,square,triangle,sky,grass'
# One decoder layer and a ResNet-18: compiles in half the time of the tiny default.
SMALLER = ('--config.model.dec_layers=1', '--config.model.backbone_depth=18')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, private_cache):
  """A tiny proposal network trained for 2 steps through the CLI."""
  del private_cache  # the built-in set is made in the module's own cache
  workdir = str(tmp_path_factory.mktemp('proposals') / 'run')
  run_main(f'--config={TINY}', f'--workdir={workdir}', '--config.total_steps=2', *SMALLER, check=True)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  # Deep supervision: the initial queries' and the decoder layer's terms, class term included.
  assert {'loss_ce', 'loss_mask', 'loss_dice', 'loss_ce_0', 'loss_mask_0', 'loss_dice_0'} == {
      k for k in logged[-1] if k.startswith('loss_')}
  assert all(np.isfinite(entry['loss']) for entry in logged)
  return workdir


def test_propose_writes_proposals_a_maskclip_dataset_is_built_with(trained, tmp_path):
  run_main(f'--config={TINY}', f'--workdir={trained}', '--mode=propose', *SMALLER, check=True)
  out = os.path.join(trained, 'proposals', 'seg_sample-v1-step2')
  assert len(os.listdir(out)) == seg_sample.SAMPLE_SIZE and not [n for n in os.listdir(out) if n.startswith('.')]
  masks, scores = seg_data.load_proposals(os.path.join(out, 'shapes_005.npz'), seg_sample.SAMPLE_HW)
  assert masks.dtype == np.bool_ and 0 < len(masks) <= 10 and masks.shape[1:] == seg_sample.SAMPLE_HW
  assert np.all(np.diff(scores) <= 0) and np.all((scores > 0) & (scores <= 1))

  # The files are what a MaskCLIP dataset stores: build one with them and read its batches.
  items = [seg_sample._sample_item(i) for i in range(4)]  # pylint: disable=protected-access
  built = str(tmp_path / 'with_proposals')
  seg_data.write_segmentation_dataset(built, items, seg_sample.SAMPLE_CATEGORIES, dataset='seg_sample',
                                      split='train', kind='panoptic', proposals_dir=out)
  data = ml_collections.ConfigDict(dict(name='segmentation', path=built, resolution=64, random_flip=False,
                                        max_segments=8, max_proposals=10, proposals='stored'))
  batch = next(seg_data.make_segmentation_iterator(data, local_batch_size=2, train=False))
  assert batch['proposal_valid'].any() and batch['proposals'].shape == (2, 10, 64, 64)


def test_eval_reports_recall_equal_to_the_proposals_scored_directly(trained):
  result = run_main(f'--config={TINY}', f'--workdir={trained}', '--mode=eval', '--config.evals.recall.max_images=6',
                    *SMALLER, check=True)
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed['step'] == 2 and printed['recall/images'] == 6

  # The same network's proposals scored here, in two process shards merged.
  config = config_lib.load_config(TINY)
  model, params = proposals.load_network(trained, 'the test run', config)
  propose = proposals.make_proposer(model, params, 64, config.propose.topk)
  source, info = seg_data.make_segmentation_source(config.data)
  first, second = (proposal_recall.recall_shard(propose, source, info.categories, 6, i, 2) for i in (0, 1))
  assert (first.images, second.images) == (3, 3)
  first.merge(second)
  expected = first.compute()
  assert expected['segments'] > 6 and 0 < expected['average_recall'] <= expected['recall_50']
  assert {f'recall/{k}': float(v) for k, v in expected.items()} == {k: v for k, v in printed.items() if k != 'step'}


def test_segment_without_proposals_runs_the_proposal_network(trained, tmp_path):
  image, _, _ = seg_data.sample_example(3)
  Image.fromarray(image).save(tmp_path / 'shapes.png')
  workdir = str(tmp_path / 'maskclip')
  run_main(f'--config={MASKCLIP_TINY}', f'--workdir={workdir}', '--config.total_steps=1', check=True)
  segment = (f'--config={MASKCLIP_TINY}', f'--workdir={workdir}', '--mode=segment',
             f'--config.classes={CLASSES}', f'--config.image={tmp_path / "shapes.png"}')

  # A checkpoint that is not a proposal network: one sentence naming what it lacks (the CLI
  # turns it into exit 2 before anything is written).
  torch, torchvision = import_torchvision()
  torch.save(torchvision.models.resnet18().state_dict(), tmp_path / 'resnet18.pth')
  config = config_lib.load_config(MASKCLIP_TINY)
  with pytest.raises(UserError, match=r'^config\.model\.proposal_checkpoint=.* is not a Mask2Former proposal '
                                      r'network: it has no pixel_decoder/\*, predictor/\* parameters \(.*\)\.$'):
    proposals.load_network(str(tmp_path / 'resnet18.pth'), 'config.model.proposal_checkpoint', config)

  result = run_main(*segment, f'--config.model.proposal_checkpoint={trained}', check=True)
  out = os.path.join(workdir, 'segment', 'shapes')
  assert sorted(os.listdir(out)) == ['masks', 'overlay.png', 'panoptic.json', 'panoptic.png']
  assert Image.open(os.path.join(out, 'panoptic.png')).size == (128, 96)
  assert 'Wrote' in result.stdout


def import_torchvision():
  torch = pytest.importorskip('torch')
  oracles.declare_torchvision_ops()
  return torch, pytest.importorskip('torchvision')


def tiny_model():
  config = config_lib.load_config(TINY)
  return Mask2Former(**config.model), config


def tiny_params(model, seed=1):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))['params']
  return jax.tree.map(np.asarray, random_params(shapes, seed))


def detectron2_state_dict(params) -> dict:
  """The detectron2 key set of `params` by the inverse of the naming rules (mask2former.py's
  docstring), written out independently of the converter."""
  out = {}
  norm_leaf = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
  for name, array in weights.flatten(params).items():
    parts = name.split('/')
    if parts[0] == 'backbone':
      block = re.fullmatch(r'layer(\d)_(\d+)', parts[1])
      if block:
        prefix = f'backbone.res{int(block.group(1)) + 1}.{block.group(2)}.'
        conv, leaf = parts[2], parts[3]
        module = {'downsample_0': 'shortcut', 'downsample_1': 'shortcut.norm'}.get(
            conv, re.sub(r'bn(\d)', r'conv\1.norm', conv))
      else:
        prefix, module, leaf = 'backbone.stem.', {'conv1': 'conv1', 'bn1': 'conv1.norm'}[parts[1]], parts[2]
      out[f'{prefix}{module}.{"weight" if leaf == "kernel" else norm_leaf[leaf]}'] = (
          array.transpose(3, 2, 0, 1) if leaf == 'kernel' else array)
      continue
    if name == 'pixel_decoder/transformer/level_embed':
      out['sem_seg_head.pixel_decoder.transformer.level_embed'] = array
      continue
    *modules, leaf = parts
    modules = [m if m in ('adapter_1', 'layer_1') else re.sub(r'_(\d+)', r'.\1', m) for m in modules]
    if modules[-1] in ('q_proj', 'k_proj', 'v_proj'):
      key = 'sem_seg_head.' + '.'.join(modules[:-1]) + ('.in_proj_weight' if leaf == 'kernel' else '.in_proj_bias')
      out.setdefault(key, {})[modules[-1]] = array.T if leaf == 'kernel' else array
      continue
    torch_array = (array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T) if leaf == 'kernel' else array
    out[f'sem_seg_head.{".".join(modules)}.{"bias" if leaf == "bias" else "weight"}'] = torch_array
  for key, value in out.items():
    if isinstance(value, dict):
      out[key] = np.concatenate([value['q_proj'], value['k_proj'], value['v_proj']])
  return out


def test_converter_round_trip_and_unmapped_keys(tmp_path):
  model, _ = tiny_model()
  params = tiny_params(model)
  state_dict = detectron2_state_dict(params)
  assert 'sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_weight' in state_dict
  assert 'backbone.res3.0.shortcut.norm.running_var' in state_dict
  state_dict['criterion.empty_weight'] = np.ones(2, np.float32)
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({'model': {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
              'iteration': 2}, tmp_path / 'mask_proposal_network.pth')
  loaded = pytorch.load_state_dict(str(tmp_path / 'mask_proposal_network.pth'))[0]
  fields, converted, unmapped = m2f_convert.convert_state_dict(loaded, num_heads=model.num_heads)
  assert fields == {k: getattr(model, k) for k in fields}
  assert unmapped == ['criterion.empty_weight']
  assert jax.tree.structure(converted) == jax.tree.structure(params)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(converted)[0], jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

  # MaskCLIP's released network has no class head: zero-filled, every query scores 0.5.
  headless = {k: v for k, v in loaded.items() if '.class_embed.' not in k}
  _, converted, _ = m2f_convert.convert_state_dict(headless, num_heads=model.num_heads)
  assert not np.any(converted['predictor']['class_embed']['kernel']) and converted['predictor']['class_embed']['bias'].shape == (2,)

  # Missing keys are listed; a file pickling more than weights is refused in one sentence.
  del loaded['sem_seg_head.predictor.decoder_norm.weight']
  with pytest.raises(UserError, match=r'^the checkpoint is not a Mask2Former proposal network: it has no value '
                                      r'for 1 parameters \(predictor/decoder_norm/scale\)\.$'):
    m2f_convert.convert_state_dict(loaded, num_heads=model.num_heads)
  torch.save({'model': {'a': torch.ones(1)}, 'scheduler': optax.EmptyState()}, tmp_path / 'pickled.pth')
  with pytest.raises(UserError, match=r'cannot be read with torch.load\(weights_only=True\) \(it pickles '
                                      r'optax.*EmptyState\); this project never unpickles code'):
    pytorch.load_state_dict(str(tmp_path / 'pickled.pth'))


def test_torchvision_resnet50_becomes_the_backbone():
  _, torchvision = import_torchvision()
  torch_model = torchvision.models.resnet50()
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  params, unmapped = m2f_convert.convert_torchvision_resnet(state_dict)
  assert unmapped == ['fc.bias', 'fc.weight']
  flat = weights.flatten(params)
  leaf = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
  compared = 0
  for key, value in state_dict.items():
    module, _, name = key.rpartition('.')
    if module == 'fc' or name == 'num_batches_tracked':
      continue
    path = 'backbone/' + re.sub(r'\.(\d+)', r'_\1', module).replace('.', '/')
    if value.ndim == 4:
      np.testing.assert_array_equal(flat[f'{path}/kernel'], value.transpose(2, 3, 1, 0))
    else:
      np.testing.assert_array_equal(flat[f'{path}/{leaf[name]}'], value)
    compared += 1
  assert compared == len(flat)
  # The whole network's backbone takes them as they are (what init_from checks).
  shapes = weights.flatten(jax.eval_shape(lambda: Mask2Former().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))['params'])
  assert all(shapes[n].shape == a.shape for n, a in flat.items())


def test_proposer_bad_input_and_empty_result(tmp_path):
  model, config = tiny_model()
  params = tiny_params(model)
  params['predictor']['class_embed']['bias'] = np.array([-20.0, 20.0], np.float32)  # all "no object"
  propose = proposals.make_proposer(model, params, 64, 10, score_threshold=0.5)
  with pytest.raises(UserError, match=r'^photo: the proposal network needs an RGB image \(uint8 \[H, W, 3\]\), '
                                      r'got uint8 \(40, 40\)\.$'):
    propose(np.zeros((40, 40), np.uint8), 'photo')
  with pytest.raises(UserError, match=r'^photo: the 400x20 image becomes 64x3 at the proposal input size 64; its '
                                      r'shorter side must reach the backbone stride 32'):
    propose(np.zeros((20, 400, 3), np.uint8), 'photo')
  with pytest.raises(UserError, match=r'^config.model.proposal_resolution=100: .* multiple of its stride 32'):
    proposals.check_input_size(100, 'config.model.proposal_resolution')

  # Nothing above the threshold: a defined empty result, written and read back as such.
  config = config_lib.load_config(TINY, [f'propose.out={tmp_path / "out"}', 'propose.score_threshold=0.5'])
  proposals.write_proposals(config, propose, str(tmp_path / 'run'))
  masks, scores = seg_data.load_proposals(str(tmp_path / 'out' / 'shapes_000.npz'), seg_sample.SAMPLE_HW)
  assert masks.shape == (0, *seg_sample.SAMPLE_HW) and scores.shape == (0,)
  for key, value, words in [('propose.topk', '0', 'keep at least 1'), ('model.num_classes', '3', 'class-agnostic'),
                            ('data.resolution', '80', 'multiple of its stride 32')]:
    with pytest.raises(UserError, match=words):
      proposals.validate(config_lib.load_config(TINY, [f'{key}={value}']))


def test_lr_multipliers_scale_a_parameter_group():
  opt = ml_collections.ConfigDict(dict(name='adamw', learning_rate=1e-2, schedule='constant', warmup_steps=0,
                                       b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip=0.01,
                                       ema_decay=0.0, lr_multipliers=(('^backbone/', 0.1),)))
  tx, _ = trainer.make_optimizer(opt, total_steps=10)
  params = {'backbone': {'kernel': jnp.ones(3)}, 'head': {'kernel': jnp.ones(3)}}
  grads = {'backbone': {'kernel': jnp.full(3, 2.0)}, 'head': {'kernel': jnp.full(3, 2.0)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['backbone']['kernel'], 0.1 * updates['head']['kernel'], rtol=1e-6)
  assert float(updates['head']['kernel'][0]) < 0
  for multipliers, words in [((('^nothing/', 0.1),), 'matches no parameter'), ((('^head/', 0),), 'factor > 0'),
                             ((('(', 0.1),), 'not a regular expression')]:
    with pytest.raises(UserError, match=words):
      weights.check_lr_multipliers(multipliers, params)
