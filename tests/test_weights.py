"""Weights from the config: init_from (another workdir, a converted guided-diffusion
directory, the .pt itself), config.frozen, the run's config.json and a named-key error
when a checkpoint does not fit the config, and training that stops on a non-finite loss."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import ROOT, run_main
from tests.test_train import SMALL, final_state
from visgen_jax.convert import guided_diffusion
from visgen_jax.errors import UserError
from visgen_jax.models.adm_unet import ADMUNet
from visgen_jax.train import config as config_lib
from visgen_jax.train import checkpoint, trainer, weights

# SMALL (tests/test_train.py) as in-process overrides: the tiny ADM at 16², one level.
OVERRIDES = [a[len('--config.'):] for a in SMALL if a.startswith('--config.')]
# The middle block: a subtree with convolutions, norms and attention.
FROZEN = '^middle_block_'


def small(*overrides):
  return config_lib.load_config('configs/adm_ffhq256.py:tiny', [*OVERRIDES, *overrides])


def flat(tree):
  return {k: np.asarray(v) for k, v in weights.flatten(tree).items()}


def directory_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope='module')
def first(tmp_path_factory):
  """A finished 2-step run whose EMA differs from its raw parameters."""
  workdir = str(tmp_path_factory.mktemp('first'))
  trainer.train(small('total_steps=2', 'optimizer.ema_decay=0.5'), workdir)
  return workdir


def test_fine_tuning_from_a_workdir_with_a_frozen_subtree(first, tmp_path):
  _, start = final_state(first)
  start_ema = flat(weights.merge(start['ema_params'], start['params']))
  runs = {}
  for name, frozen in (('frozen', FROZEN), ('all', None)):
    workdir = str(tmp_path / name)
    config = small(f'init_from={first}', 'total_steps=3', *([f'frozen={frozen}'] if frozen else []))
    trainer.train(config, workdir)
    runs[name] = (workdir, final_state(workdir)[1])

  workdir, state = runs['frozen']
  params, ema = flat(state['params']), flat(state['ema_params'])
  frozen_names = [n for n in params if n.startswith('middle_block_')]
  assert frozen_names and len(frozen_names) < len(params)
  for name in frozen_names:  # the first run's EMA weights, untouched by 3 steps
    np.testing.assert_array_equal(params[name], start_ema[name], err_msg=name)
  assert not any(n.startswith('middle_block_') for n in ema)  # no EMA copy ...
  moments = list(weights.flatten(state['opt_state']))
  assert any('out_conv' in n for n in moments) and not any('middle_block_' in n for n in moments)  # ... no moments
  moved = [n for n in params if n not in frozen_names and not np.array_equal(params[n], start_ema[n])]
  assert len(moved) > len(params) // 2  # the rest trained from the first run's weights
  # EMA and Adam's two moments of the frozen subtree are not written: three copies fewer.
  frozen_bytes = sum(params[n].nbytes for n in frozen_names)
  sizes = {name: directory_bytes(os.path.join(w, 'checkpoints', '3')) for name, (w, _) in runs.items()}
  assert sizes['all'] - sizes['frozen'] > 2.5 * frozen_bytes
  # The run describes itself.
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['frozen'] == [FROZEN]
  # A run with frozen parameters is a source too: its EMA where kept, its raw weights elsewhere.
  config = small()
  again = weights.initial_weights((workdir,), config, trainer.setup(config).abstract_state['params'])
  assert again.keys() == params.keys()
  for name, value in again.items():
    np.testing.assert_array_equal(value, params[name] if name in frozen_names else ema[name], err_msg=name)


def test_init_from_selected_renamed_and_checked(first, tmp_path):
  config = small()
  shapes = trainer.setup(config).abstract_state['params']
  raw = flat(final_state(first)[1]['params'])
  loaded = weights.initial_weights(({'path': first, 'use_ema': False, 'select': '^out_'},), config, shapes)
  assert set(loaded) == {'out_conv/bias', 'out_conv/kernel', 'out_norm/bias', 'out_norm/scale'}
  np.testing.assert_array_equal(loaded['out_conv/kernel'], raw['out_conv/kernel'])
  with pytest.raises(UserError, match=r'config.init_from\[0\].*selects no parameter'):
    weights.initial_weights(({'path': first, 'select': '^nothing'},), config, shapes)
  with pytest.raises(UserError, match='2 selected parameters do not exist in this model .*renamed/'):
    weights.initial_weights(({'path': first, 'select': '^renamed/out_conv/', 'rename': ('^', 'renamed/')},),
                            config, shapes)
  other = small('model.model_channels=64')
  with pytest.raises(UserError, match=r'have another shape than in this model \(.*\(3, 3, 3, 32\) vs \(3, 3, 3, 64\)'):
    weights.initial_weights((first,), other, trainer.setup(other).abstract_state['params'])
  for bad, words in [(str(tmp_path / 'none'), 'no such workdir'), ({'path': first, 'selct': 'x'}, 'selct'),
                     ({'path': first, 'select': '('}, 'not a regular expression')]:
    with pytest.raises(UserError, match=words):
      weights.sources((bad,))
  # Read and refused before anything is written.
  with pytest.raises(UserError, match='another shape'):
    trainer.train(small('init_from=' + first, 'model.model_channels=64'), str(tmp_path / 'never'))
  assert not (tmp_path / 'never').exists()
  # Frozen parameters that nothing loads would stay random.
  with pytest.raises(UserError, match=r'keeps 26 parameters \(middle_block_0/emb_proj/bias, ...\) at their random'):
    trainer.train(small(f'frozen={FROZEN}'), str(tmp_path / 'random'))
  assert not (tmp_path / 'random').exists()


def test_init_from_a_guided_diffusion_checkpoint_and_its_conversion(tmp_path):
  torch = pytest.importorskip('torch')
  unet = pytest.importorskip('guided_diffusion.unet')
  config = small('total_steps=1', 'optimizer.learning_rate=0.0', 'ckpt_every=1')
  fields = config.model.to_dict()
  torch.manual_seed(0)
  args = {k: v for k, v in fields.items() if k not in ('code_dim', 'num_classes', 'remat')}
  args['attention_resolutions'] = tuple(fields['image_size'] // r for r in fields['attention_resolutions'])
  model = unet.UNetModel(**args)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  torch.save(model.state_dict(), tmp_path / 'model.pt')
  expected = flat(guided_diffusion.convert_unet_state_dict(
      {k: v.numpy() for k, v in model.state_dict().items()}, ADMUNet(**fields)))

  converted = tmp_path / 'converted'
  done = subprocess.run([sys.executable, '-m', 'visgen_jax.convert', f'--input={tmp_path / "model.pt"}',
                         f'--output={converted}', '--config=configs/adm_ffhq256.py:tiny',
                         *[f'--config.{o}' for o in OVERRIDES if o.startswith('model.')]],
                        capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-2000:]

  shapes = trainer.setup(config).abstract_state['params']
  from_pt = weights.initial_weights((str(tmp_path / 'model.pt'),), config, shapes)
  assert from_pt.keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_array_equal(from_pt[name], value, err_msg=name)
  # Through the trainer, from the converted directory: a zero learning rate keeps them.
  workdir = str(tmp_path / 'run')
  trainer.train(small('total_steps=1', 'optimizer.learning_rate=0.0', f'init_from={converted}'), workdir)
  params = flat(final_state(workdir)[1]['params'])
  for name, value in expected.items():
    np.testing.assert_array_equal(params[name], value, err_msg=name)


def test_an_ema_decay_of_zero_keeps_no_copy_and_inference_takes_the_raw_weights(first, tmp_path):
  workdir = str(tmp_path / 'no_ema')
  config = small('total_steps=2', 'optimizer.ema_decay=0.0', 'sample.use_ema=True')
  trainer.train(config, workdir)
  state = final_state(workdir)[1]
  assert weights.flatten(state['ema_params']) == {}
  params = flat(state['params'])
  # The checkpoint stores no EMA copy; the first run's (decay 0.5) stores one of every parameter.
  ema_saved = {w: {n for n in checkpoint.saved_state_shapes(os.path.join(w, 'checkpoints'))
                   if n.startswith('ema_params/')} for w in (first, workdir)}
  assert not ema_saved[workdir] and {n[len('ema_params/'):] for n in ema_saved[first]} == params.keys()
  # Samples, evaluations (use_ema=True) and init_from (use_ema by default) take the raw weights.
  s = trainer.setup(config)
  restored, step = trainer.restore_latest(s, workdir)
  inference = {'sampling': flat(trainer._params_and_key(s, restored, step)[0]),
               'init_from': weights.initial_weights((workdir,), config, s.abstract_state['params'])}
  for name, got in inference.items():
    assert got.keys() == params.keys(), name
    for key, value in got.items():
      np.testing.assert_array_equal(value, params[key], err_msg=f'{name}: {key}')


def test_resuming_or_sampling_with_another_architecture_names_the_key(first):
  for mode in ('train', 'sample'):
    config = small('model.model_channels=64', 'total_steps=4')
    with pytest.raises(UserError, match=r'config.model.model_channels=64 \(the run has 32\)'):
      trainer.train(config, first) if mode == 'train' else trainer.run_command(config, first, mode)


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path):
  """The issue's command, after 10 healthy steps: every loss NaN from step 11 on."""
  command = ['--config=configs/adm_ffhq256.py:tiny', f'--workdir={tmp_path}', '--config.ckpt_every=5',
             '--config.sample_every=0']
  run_main(*command, '--config.total_steps=10', check=True)
  result = run_main(*command, '--config.optimizer.learning_rate=1e12', '--config.total_steps=30')
  assert result.returncode == 1
  message = result.stderr.strip().splitlines()[-1]
  assert 'not finite' in message and 'the latest checkpoint (step 10)' in message, result.stderr[-2000:]
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()) == [5, 10]
  step, state = final_state(tmp_path)
  assert step == 10 and all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state)))
