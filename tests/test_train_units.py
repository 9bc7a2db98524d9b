"""Trainer pieces in-process: optimizer schedule, clipping, sharding rules, overrides, config
variants, bf16."""

import glob

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from visgen_jax.errors import UserError
from visgen_jax.train import config as config_lib
from visgen_jax.train import sharding, trainer, weights

TINY = 'configs/adm_ffhq256.py:tiny'


def test_overrides_parse_by_the_type_of_the_default():
  c = config_lib.load_config(TINY, ['total_steps=7', 'optimizer.learning_rate=3', 'data.random_flip=false',
                                    'model.channel_mult=1,2,4', 'compute_dtype=bfloat16'])
  assert c.total_steps == 7 and isinstance(c.total_steps, int)
  assert c.optimizer.learning_rate == 3.0 and isinstance(c.optimizer.learning_rate, float)
  assert c.data.random_flip is False
  assert c.model.channel_mult == (1, 2, 4)
  assert c.compute_dtype == 'bfloat16'
  with pytest.raises(UserError, match=r"did you mean 'learning_rate'"):
    config_lib.load_config(TINY, ['optimizer.learning_rat=1'])
  with pytest.raises(UserError, match='comma-separated list of int'):
    config_lib.load_config(TINY, ['model.channel_mult=1,x'])


def test_variant_applies_the_named_change_or_names_the_allowed_ones():
  config = ml_collections.ConfigDict({'steps': 100})
  tiny = lambda c: c.update(steps=2)
  assert config_lib.variant(config, None, 'configs/x.py', tiny=tiny).steps == 100
  assert config_lib.variant(config, 'tiny', 'configs/x.py', tiny=tiny).steps == 2
  with pytest.raises(UserError, match=r'^--config=configs/x\.py:huge: unknown variant; allowed: tiny, small, or none'):
    config_lib.variant(config, 'huge', 'configs/x.py', tiny=tiny, small=tiny)


@pytest.mark.parametrize('path', sorted(set(glob.glob('configs/*.py')) - {'configs/patchdm_base.py'}))
def test_every_config_loads_its_tiny_variant_and_refuses_unknown_ones(path):
  tiny, paper = config_lib.load_config(f'{path}:tiny'), config_lib.load_config(path)
  assert tiny.total_steps < paper.total_steps and tiny.batch_size <= paper.batch_size  # CPU-sized
  with pytest.raises(UserError, match=rf'^--config={path}:huge: unknown variant; allowed: (\w+, )*tiny(, \w+)*, or none'):
    config_lib.load_config(f'{path}:huge')


def test_warmup_then_cosine_and_gradient_clipping():
  opt = ml_collections.ConfigDict(dict(name='sgd', learning_rate=1.0, schedule='cosine', warmup_steps=10,
                                       b1=0.0, b2=0.0, eps=0.0, weight_decay=0.0, grad_clip=0.5,
                                       ema_decay=0.0))
  tx, lr = trainer.make_optimizer(opt, total_steps=110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)], [0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  params = {'w': jnp.zeros(4)}
  grads = {'w': jnp.full(4, 10.0)}  # norm 20, clipped to 0.5
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.global_norm(updates), 0.5 * lr(0), atol=1e-7)


def test_frozen_regexes_pick_parameters_by_path():
  params = {'clip': {'blocks_0': {'kernel': jnp.ones(3)}}, 'rma': {'kernel': jnp.ones(2)}}
  mask = weights.trainable_mask(params, ('^clip/',))
  assert mask == {'clip': {'blocks_0': {'kernel': False}}, 'rma': {'kernel': True}}
  trainable = weights.only(params, mask)
  assert [x.shape for x in jax.tree.leaves(trainable)] == [(2,)]  # nothing of CLIP
  moved = jax.tree.map(lambda x: x + 1, trainable)
  merged = weights.merge(moved, params)
  assert float(merged['rma']['kernel'][0]) == 2 and float(merged['clip']['blocks_0']['kernel'][0]) == 1
  for frozen, words in [(('^nothing/',), 'matches no parameter'), (('(',), 'not a regular expression'),
                        (('.',), 'freezes every parameter')]:
    with pytest.raises(UserError, match=words):
      weights.check_frozen(frozen, params)


def test_sharding_rules_then_fsdp_fallback():
  assert sharding._parse_spec('model,', 2, 'w') == P('model', None)
  assert sharding._parse_spec('', 3, 'w') == P(None, None, None)
  with pytest.raises(UserError, match="axis 'heads'"):
    sharding._parse_spec('heads', 2, 'w')
  with pytest.raises(UserError, match='names 3 dimensions'):
    sharding._parse_spec('data,fsdp,model', 2, 'w')
  assert sharding._fsdp_spec((3, 3, 256, 512), 4) == P(None, None, None, 'fsdp')
  assert sharding._fsdp_spec((3, 3, 256, 510), 4) == P(None, None, 'fsdp', None)
  assert sharding._fsdp_spec((512,), 4) == P()  # small arrays stay whole
  assert sharding._fsdp_spec((3, 3, 256, 512), 1) == P()
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'model': 1})
  tree = {'attn': {'qkv': jnp.zeros((8, 24))}, 'conv': jnp.zeros((4, 4))}
  placed = sharding.tree_shardings(tree, mesh, [('attn/qkv', ',model')])
  assert placed['attn']['qkv'].spec == P(None, 'model') and placed['conv'].spec == P()


def test_mesh_must_fit_the_devices():
  n = len(jax.devices())
  with pytest.raises(UserError, match=f'does not fit the {n} devices'):
    sharding.make_mesh({'data': n + 1, 'fsdp': 1, 'model': 1})
  with pytest.raises(UserError, match='at most one may be -1'):
    sharding.make_mesh({'data': -1, 'fsdp': -1, 'model': 1})


def test_bf16_compute_keeps_float32_master_weights():
  config = config_lib.load_config(TINY, ['compute_dtype=bfloat16', 'data.resolution=16', 'model.image_size=16',
                                         'model.channel_mult=1', 'batch_size=2', 'mesh.data=1'])
  s = trainer.setup(config)
  step = trainer.make_train_step(s)
  batch = {'image': jnp.zeros((2, 16, 16, 3)), 'index': jnp.arange(2, dtype=jnp.int32)}
  state = jax.jit(lambda k, b: trainer._init_state(s.system, s.tx, s.trainable, k, b),
                  out_shardings=s.state_shardings)(
      jax.random.key(0), batch)
  before = jax.tree.map(np.asarray, state['params'])
  state, (metrics, _) = step(state, batch)
  assert np.isfinite(float(metrics['loss']))
  leaves = jax.tree.leaves(state['params'])
  assert all(x.dtype == jnp.float32 for x in leaves)
  assert any(np.any(np.asarray(a) != b) for a, b in zip(leaves, jax.tree.leaves(before)))
  # The model really computed in bf16: its lowered step holds bf16 convolutions.
  assert 'bf16' in step.lower(state, batch).as_text()
