"""Model state in the trainer (System.state_keys): BatchNorm statistics move in
training, stay bit-identical when config.frozen matches them, never enter the
optimizer or EMA, and come back on resume."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import final_state
from visgen_jax.systems import System
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer, weights


class TinyBatchNormNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dense(4)(x.reshape(x.shape[0], -1))
    return nn.BatchNorm(use_running_average=not train, momentum=0.5)(h)


def tiny_system():
  net = TinyBatchNormNet()

  def init(key, batch):
    return dict(net.init(key, batch['image'], train=False))

  def loss_fn(params, batch, key):
    out, updated = net.apply(params, batch['image'], train=True, mutable=['batch_stats'])
    return jnp.mean((out - 1.0) ** 2), {}, updated

  return System(init=init, loss_fn=loss_fn, state_keys=('batch_stats',))


def tiny_config(*overrides):
  return config_lib.load_config('configs/adm_ffhq256.py:tiny', [
      'data.resolution=8', 'model.image_size=8', 'model.channel_mult=1', 'batch_size=4', 'sample_every=0',
      'log_every=1', 'ckpt_every=2', 'optimizer.ema_decay=0.5', *overrides])


@pytest.fixture
def bn_system(monkeypatch, private_cache):
  monkeypatch.setattr(trainer, 'get_system', lambda config: tiny_system())


def flat(tree):
  return {k: np.asarray(v) for k, v in weights.flatten(tree).items()}


def test_statistics_move_are_not_optimised_and_resume(bn_system, tmp_path):
  workdir = str(tmp_path / 'run')
  trainer.train(tiny_config('total_steps=2'), workdir)
  _, at2 = final_state(workdir)
  stats = {n: v for n, v in flat(at2['params']).items() if n.startswith('batch_stats/')}
  assert stats
  assert not any(np.array_equal(v, np.zeros_like(v)) or np.array_equal(v, np.ones_like(v)) for v in stats.values())
  for tree in (at2['ema_params'], at2['opt_state']):
    assert not any('batch_stats' in name for name in weights.flatten(tree))

  # Resumed to step 4 == one run of 4 steps, statistics included.
  trainer.train(tiny_config('total_steps=4'), workdir)
  straight = str(tmp_path / 'straight')
  trainer.train(tiny_config('total_steps=4'), straight)
  resumed, uninterrupted = flat(final_state(workdir)[1]['params']), flat(final_state(straight)[1]['params'])
  assert resumed.keys() == uninterrupted.keys()
  for name in resumed:
    np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)
  assert not np.array_equal(resumed['batch_stats/BatchNorm_0/mean'], stats['batch_stats/BatchNorm_0/mean'])


def test_frozen_statistics_stay_bit_identical(bn_system, tmp_path):
  first = str(tmp_path / 'first')
  trainer.train(tiny_config('total_steps=2'), first)
  start = flat(final_state(first)[1]['params'])
  second = str(tmp_path / 'second')
  trainer.train(tiny_config('total_steps=2', f'init_from={first}', 'frozen=^batch_stats/'), second)
  end = flat(final_state(second)[1]['params'])
  for name in start:
    if name.startswith('batch_stats/'):
      np.testing.assert_array_equal(end[name], start[name], err_msg=name)
  assert not np.array_equal(end['params/Dense_0/kernel'], start['params/Dense_0/kernel'])
