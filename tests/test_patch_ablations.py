"""The seam ablation: independent and pixel-shifted patch denoisers, where their
borders are, and the seam score."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import random_params
from visgen_jax.models import patch_ablations
from visgen_jax.models.patch_unet import PatchUNet, grid_positions, midpoints, to_patches

TINY_UNET = dict(patch_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(), embed_dim=16, pos_channels=4, code_dim=4, dropout=0.0)


def test_seam_score_is_one_for_a_seamless_ramp_and_the_jump_ratio_for_steps():
  h, w, p = 8, 12, 4
  ramp = np.add.outer(np.arange(h), np.arange(w))[None, :, :, None].astype(float)
  rows, cols = (patch_ablations.patch_borders('collage', n, p) for n in (h, w))
  assert patch_ablations.seam_score(ramp, rows, cols) == pytest.approx(1.0)
  # Each patch constant, neighbours differing by 1 in both directions: across = 1, inside = 0.
  steps = np.add.outer(np.arange(h) // p, np.arange(w) // p)[None, :, :, None].astype(float) + 0.1 * ramp
  # Across a border the difference is 1 + 0.1, inside 0.1.
  assert patch_ablations.seam_score(steps, rows, cols) == pytest.approx(11.0)
  # The same steps measured at the padded grid's borders (p/2 + k·p) see no jump.
  rows, cols = (patch_ablations.patch_borders('independent', n, p) for n in (h, w))
  inside_only = patch_ablations.seam_score(steps, rows, cols)
  assert inside_only < 1.0


def test_patch_borders_per_mode():
  np.testing.assert_array_equal(patch_ablations.patch_borders('collage', 16, 4), [4, 8, 12])
  np.testing.assert_array_equal(patch_ablations.patch_borders('independent', 16, 4), [2, 6, 10, 14])
  np.testing.assert_array_equal(patch_ablations.patch_borders('pixel_shift', 16, 4),
                                [2, 4, 6, 8, 10, 12, 14])
  with pytest.raises(ValueError, match="patch mode 'feature' is unknown"):
    patch_ablations.patch_borders('feature', 16, 4)


@pytest.fixture(scope='module')
def tiny_unet():
  unet = PatchUNet(**TINY_UNET)
  x = jnp.zeros((1, 2, 2, 8, 8, 3))
  shapes = jax.eval_shape(lambda k: unet.init(k, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 2, 2, 2)),
                                              jnp.zeros((1, 4)), decode='both')['params'], jax.random.key(0))
  return unet, random_params(shapes)


@functools.partial(jax.jit, static_argnums=0)
# Outputs are compared across separately compiled programs: fp32 reassociation, ~1e-6.
def _plain_apply(unet, params, x, t, code, pos, keep):
  out = unet.apply({'params': params}, to_patches(x, 8), t, jnp.broadcast_to(pos, (x.shape[0], *pos.shape)),
                   code, keep, decode='plain')
  return out


def _check_independent_denoiser_is_each_padded_patch_on_its_own(unet, params):
  pos, mask = grid_positions((2, 3), (2, 3))
  denoise = jax.jit(patch_ablations.independent_denoiser(unet, params, pos, mask))
  x = jax.random.normal(jax.random.key(2), (2, 16, 24, 3))
  t, code = jnp.array([10, 500]), jax.random.normal(jax.random.key(3), (2, 4))
  out = np.asarray(denoise(x, t, code, jnp.ones((2,))))
  padded = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  patches = _plain_apply(unet, params, padded, t, code, jnp.asarray(pos), jnp.ones((2, 3, 4)))
  # Padded patch (1, 1) covers image rows and columns 4 … 11.
  np.testing.assert_allclose(out[:, 4:12, 4:12], np.asarray(patches)[:, 1, 1], atol=1e-5)
  # Independent: a change inside padded patch (0, 0) (image rows, columns 0 … 3) stays there.
  changed = np.asarray(denoise(x.at[:, 1, 1].add(1.0), t, code, jnp.ones((2,)))) != out
  assert changed[:, :4, :4].any() and not changed[:, 4:].any() and not changed[:, :, 4:].any()


def test_independent_and_pixel_shift_denoisers(tiny_unet):
  """One test, so the tiny UNet compiles once per run."""
  unet, params = tiny_unet
  _check_independent_denoiser_is_each_padded_patch_on_its_own(unet, params)
  # Pixel shift alternates between the padded and the unshifted grid.
  pos, mask = grid_positions((2, 3), (2, 3))
  timesteps = np.array([999, 666, 333, 0])
  # Built inside jit, as the recipe's jitted sampler builds it.
  denoise = jax.jit(lambda *args: patch_ablations.pixel_shift_denoiser(unet, params, pos, mask, timesteps)(*args))
  independent = jax.jit(patch_ablations.independent_denoiser(unet, params, pos, mask))
  x = jax.random.normal(jax.random.key(4), (1, 16, 24, 3))
  code, use = jax.random.normal(jax.random.key(5), (1, 4)), jnp.ones((1,))
  mid, mid_mask = midpoints(jnp.asarray(pos)[None], jnp.asarray(mask)[None])
  for t, shifted in ((0, False), (333, True), (666, False), (999, True)):
    out = np.asarray(denoise(x, jnp.array([t]), code, use))
    if shifted:  # odd index: the image's own N1xN2 grid at the half-way positions
      expected = _plain_apply(unet, params, x, jnp.array([t]), code, mid[0], mid_mask)
      expected = np.asarray(expected).transpose(0, 1, 3, 2, 4, 5).reshape(1, 16, 24, 3)
    else:
      expected = np.asarray(independent(x, jnp.array([t]), code, use))
    np.testing.assert_allclose(out, expected, atol=1e-5)
