"""Patch-DM's feature-collage Pallas kernel (interpret mode on CPU) against the
jnp reference: a copy, so forward and gradients must be equal bit for bit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visgen_jax.errors import UserError
from visgen_jax.kernels import collage as reference
from visgen_jax.kernels import collage_pallas
from visgen_jax.models.patch_unet import PatchUNet


@functools.partial(jax.jit, static_argnames=('fn',))
def _value_and_vjp(fn, features, cot):
  out, vjp = jax.vjp(fn, features)
  return out, vjp(cot)[0]


def _features(seed, n, h, w, c, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n, h, w, c)), dtype)


def _check_equal(kernel, ref, features, seed):
  out_shape = jax.eval_shape(ref, features).shape
  cot = _features(seed + 1, *out_shape, dtype=features.dtype)
  out, grad = _value_and_vjp(kernel, features, cot)
  ref_out, ref_grad = _value_and_vjp(ref, features, cot)
  assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
  np.testing.assert_array_equal(out, ref_out)
  np.testing.assert_array_equal(grad, ref_grad)
  # The half-patch rim of the grid gets no gradient, everything else does.
  assert float(jnp.abs(grad).sum()) > 0


@pytest.mark.parametrize('grid, batch, h, w, c, block_lanes', [
    ((2, 2), 1, 4, 4, 3, None),
    ((3, 5), 2, 4, 6, 3, None),
    ((4, 3), 1, 8, 2, 5, None),
    ((3, 5), 2, 4, 6, 3, 3),  # each quadrant row copied in three chunks
])
def test_collage_and_its_gradient_equal_the_reference(grid, batch, h, w, c, block_lanes):
  features = _features(0, batch * grid[0] * grid[1], h, w, c)
  kernel = functools.partial(collage_pallas.collage, grid=grid, batch=batch, block_lanes=block_lanes)
  ref = functools.partial(reference.collage, grid=grid, batch=batch)
  _check_equal(kernel, ref, features, seed=1)


def test_bfloat16_is_copied_exactly():
  features = _features(2, 2 * 2 * 3, 4, 4, 8, jnp.bfloat16)
  kernel = functools.partial(collage_pallas.collage, grid=(2, 3), batch=2)
  ref = functools.partial(reference.collage, grid=(2, 3), batch=2)
  _check_equal(kernel, ref, features, seed=3)


@pytest.mark.parametrize('start, rows', [(0, 1), (1, 2), (3, 1)])
def test_collage_band_and_its_gradient_equal_the_reference(start, rows):
  features = _features(4, 2 * 5 * 3, 4, 4, 2)
  kernel = functools.partial(collage_pallas.collage_band, grid=(5, 3), batch=2, start=start, rows=rows)
  ref = functools.partial(reference.collage_band, grid=(5, 3), batch=2, start=start, rows=rows)
  _check_equal(kernel, ref, features, seed=5)


def test_bad_sizes_are_refused():
  with pytest.raises(UserError, match='half a patch'):
    collage_pallas.collage(_features(0, 4, 5, 4, 2), (2, 2), 1)
  with pytest.raises(UserError, match='half a patch'):
    collage_pallas.collage(_features(0, 4, 4, 3, 2), (2, 2), 1)
  with pytest.raises(UserError, match='at least 2'):
    collage_pallas.collage(_features(0, 3, 4, 4, 2), (1, 3), 1)
  with pytest.raises(UserError, match='do not form'):
    collage_pallas.collage(_features(0, 5, 4, 4, 2), (2, 2), 1)
  with pytest.raises(UserError, match='block_lanes'):
    collage_pallas.collage(_features(0, 4, 4, 4, 2), (2, 2), 1, block_lanes=3)
  with pytest.raises(UserError, match='outside'):
    collage_pallas.collage_band(_features(0, 2 * 5 * 3, 4, 4, 2), (5, 3), 2, start=3, rows=2)
  with pytest.raises(UserError, match='collage_impl'):
    collage_pallas.select('einops')


def _tiny_unet(collage_impl):
  return PatchUNet(patch_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(8,), embed_dim=32, pos_channels=8, code_dim=8, dropout=0.0,
                   collage_impl=collage_impl)


def test_patch_unet_with_the_pallas_collage_equals_the_xla_one():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(1, 2, 3, 16, 16, 3)), jnp.float32)
  t = jnp.array([321])
  pos = jnp.asarray(np.stack(np.meshgrid(np.arange(2.), np.arange(3.), indexing='ij'), -1)[None],
                    jnp.float32)
  code = jnp.asarray(rng.normal(size=(1, 8)), jnp.float32)
  init = lambda impl: jax.eval_shape(
      lambda: _tiny_unet(impl).init(jax.random.key(0), x, t, pos, code)['params'])
  # Random parameters from the shapes alone (a real init compiles for long; out_conv starts at 0).
  shapes = init('xla')
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape) + 0.5, jnp.float32), shapes)
  outs = {impl: jax.jit(lambda p, unet=_tiny_unet(impl): unet.apply({'params': p}, x, t, pos, code))(params)
          for impl in ('xla', 'pallas')}
  assert outs['xla'].shape == (1, 1, 2, 16, 16, 3) and float(jnp.abs(outs['xla']).max()) > 0
  np.testing.assert_array_equal(outs['pallas'], outs['xla'])
  with pytest.raises(UserError, match="collage_impl='triton'"):
    init('triton')
