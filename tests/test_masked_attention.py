"""MaskCLIP masked-attention kernel (interpret mode on CPU) against its dense reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visgen_jax.errors import UserError
from visgen_jax.kernels.masked_attention import (block_schedule, dense_mask, masked_attention,
                                                 masked_attention_reference)
from visgen_jax.nn.attention import dot_product_attention, mask_token_attention

# Interpret mode compiles each new shape for seconds: few examples, no deadline.
SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _inputs(seed, b, h, d, m, n, mask_kind, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 6)
  t = m + 1 + n
  q, k, v = (jax.random.normal(keys[i], (b, t, h, d)).astype(dtype) for i in range(3))
  if mask_kind == 'empty':
    mask = jnp.zeros((b, m, n), bool)
  elif mask_kind == 'full':
    mask = jnp.ones((b, m, n), bool)
  else:
    # Sparse random patches, with every third mask token left empty.
    mask = jax.random.bernoulli(keys[3], 0.15, (b, m, n))
    mask = mask & (jnp.arange(m) % 3 != 1)[None, :, None]
  bias = jax.random.normal(keys[4], (b, h, m, n)).astype(dtype)
  cot = jax.random.normal(keys[5], (b, t, h, d)).astype(dtype)
  return q, k, v, mask, bias, cot


@functools.partial(jax.jit, static_argnames=('fn',))
def _value_and_vjp(fn, q, k, v, mask, bias, cot):
  out, vjp = jax.vjp(lambda q, k, v, bias: fn(q, k, v, mask, bias), q, k, v, bias)
  return out, vjp(cot)


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 2), d=st.sampled_from([4, 8, 16]),
       m=st.integers(1, 12), n=st.integers(1, 40), block_q=st.sampled_from([4, 8, 16]),
       block_k=st.sampled_from([4, 8, 32]), block_m=st.sampled_from([4, 8]), mask_kind=st.sampled_from(['random', 'empty', 'full']),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_and_gradients_match_reference(b, h, d, m, n, block_q, block_k, block_m,
                                               mask_kind, with_bias, seed):
  q, k, v, mask, bias, cot = _inputs(seed, b, h, d, m, n, mask_kind)
  bias = bias if with_bias else None
  kernel = functools.partial(masked_attention, block_q=block_q, block_k=block_k, block_m=block_m)
  out, grads = _value_and_vjp(kernel, q, k, v, mask, bias, cot)
  ref_out, ref_grads = _value_and_vjp(masked_attention_reference, q, k, v, mask, bias, cot)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for g, ref_g in zip(grads, ref_grads):
    if ref_g is not None:
      np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-5)


def test_bfloat16_within_bfloat16_tolerance():
  m, n = 7, 20
  q, k, v, mask, bias, _ = _inputs(0, 2, 2, 8, m, n, 'random', jnp.bfloat16)
  out = jax.jit(functools.partial(masked_attention, block_q=8, block_k=8))(q, k, v, mask, bias)
  assert out.dtype == jnp.bfloat16
  f32 = lambda x: x.astype(jnp.float32)
  ref = masked_attention_reference(f32(q), f32(k), f32(v), mask, f32(bias))
  np.testing.assert_allclose(f32(out), ref, rtol=2e-2, atol=2e-2)


def test_maskclip_lengths_are_padded_and_empty_masks_see_the_class_token():
  # 100 mask tokens, the class token and 24×24 patches: no length divides the blocks.
  m, n = 100, 576
  q, k, v, mask, bias, _ = _inputs(1, 1, 1, 8, m, n, 'random')
  out = jax.jit(masked_attention)(q, k, v, mask, bias)
  np.testing.assert_allclose(out, masked_attention_reference(q, k, v, mask, bias),
                             rtol=1e-5, atol=1e-5)
  # An empty mask token attends to the class token alone.
  np.testing.assert_allclose(out[0, 1], v[0, m], rtol=1e-6, atol=1e-6)


def test_skipped_blocks_are_not_read():
  # Patches only in the first key block: the middle blocks must never be visited,
  # so NaN values there cannot reach the mask tokens' outputs.
  m, n, block = 8, 40, 8
  q, k, v, _, _, _ = _inputs(2, 1, 1, 4, m, n, 'full')
  mask = jnp.zeros((1, m, n), bool).at[:, :, :3].set(True)
  schedule = block_schedule(mask, block, block)
  np.testing.assert_array_equal(schedule[0, 0], [True, False, False, False, False, True])
  v = v.at[:, m + 1 + block:m + 1 + 5 * block].set(jnp.nan)
  out = jax.jit(functools.partial(masked_attention, block_q=block, block_k=block, block_m=block))(
      q, k, v, mask)
  assert np.isfinite(out[:, :m]).all()
  assert np.isnan(out[:, m:]).all()  # class and patch tokens do read those values


def test_dense_mask_is_eq_2_1():
  mask = np.array([[[1, 0, 1], [0, 0, 0]]], bool)
  expected = np.array([[0, 0, 1, 1, 0, 1],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 1, 1],
                       [0, 0, 1, 1, 1, 1],
                       [0, 0, 1, 1, 1, 1],
                       [0, 0, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(dense_mask(mask)[0], expected)


def test_attention_entry_point_routes_both_impls():
  q, k, v, mask, bias, _ = _inputs(3, 1, 2, 4, 3, 9, 'random')
  xla = mask_token_attention(q, k, v, mask, bias)
  pallas = jax.jit(functools.partial(mask_token_attention, impl='pallas'))(q, k, v, mask, bias)
  np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match='impl'):
    mask_token_attention(q, k, v, mask, impl='triton')


def test_dot_product_attention_matches_jax_softmax_attention_and_its_gradients():
  # The entry point normalises after the product with v; jax.nn's normalises the weights.
  q, k, v, _, _, cot = _inputs(5, 2, 3, 8, 0, 10, 'empty')
  bias = jax.random.normal(jax.random.key(6), (2, 3, 11, 11))
  mask = (jnp.arange(11)[None, :] <= jnp.arange(11)[:, None] + 2)[None, None]
  mask = mask.at[:, :, 4].set(False)  # a query that sees nothing: uniform weights in both
  ours = lambda q, k, v, bias: dot_product_attention(q, k, v, bias=bias, mask=mask)
  theirs = lambda q, k, v, bias: jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                                              implementation='xla')
  out, vjp = jax.vjp(ours, q, k, v, bias)
  expected, expected_vjp = jax.vjp(theirs, q, k, v, bias)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  for grad, expected_grad in zip(vjp(cot), expected_vjp(cot)):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_user_errors():
  q, k, v, mask, bias, _ = _inputs(4, 1, 2, 4, 3, 9, 'random')
  with pytest.raises(UserError, match=r'M \+ 1 \+ N'):
    masked_attention(q, k, v, mask[:, :, 1:])
  with pytest.raises(UserError, match='bias'):
    masked_attention(q, k, v, mask, bias[:, :1])
  with pytest.raises(UserError, match='block_k'):
    masked_attention(q, k, v, mask, block_k=0)
