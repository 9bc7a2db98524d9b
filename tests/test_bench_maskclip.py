"""The MaskCLIP benchmark's FLOP accounting, on a small CLIP (compiled, never run).

The analytic count has only matmul and convolution terms; XLA's also counts the
elementwise work (layer norms, GELU, softmax, residual adds, masking), a few %
at width 256. So XLA / analytic must lie in [1, 1.08]: a missing or doubled
matmul term (e.g. RMA's refinement conv, 9 % of the RMA model here) fails.
"""

import jax
import jax.numpy as jnp
import pytest

from visgen_jax.bench import maskclip as bench
from visgen_jax.convert.clip import abstract_params
from visgen_jax.models import clip as clip_lib

SMALL = dict(embed_dim=64, act='gelu',
             vision=dict(image_size=64, patch_size=16, width=256, layers=2, heads=4),
             text=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
MASKS, IMAGE = 5, 96  # a 6×6 patch grid for the mask-token model, crops resized to 64²


@pytest.fixture(scope='module')
def tower():
  return clip_lib.vision_tower(SMALL)


def test_crop_baseline_is_masks_times_one_clip_pass_plus_resize(tower):
  images, logits = bench.abstract_inputs(IMAGE, MASKS)
  params = abstract_params(tower)
  crop = bench.compiled_flops(bench.crop_fn(tower), params, images, logits)
  passes = bench.compiled_flops(lambda p, x: tower.apply({'params': p}, x), params,
                                jax.ShapeDtypeStruct((MASKS, 64, 64, 3), jnp.float32))
  analytic = bench.crop_analytic_flops(tower, IMAGE, MASKS)
  # What the crop adds to the M passes is the resize (+ masking and resize weights).
  assert 1.0 <= (crop - passes) / analytic['crop_resize'] <= 1.2
  assert 1.0 <= crop / analytic['total'] <= 1.08


@pytest.mark.parametrize('rma_layers, model_size', [((), None), ((1, 2), 64)])
def test_analytic_count_matches_xla(tower, rma_layers, model_size):
  images, logits = bench.abstract_inputs(IMAGE, MASKS)
  model, fn = bench.maskclip_fn(tower, rma_layers, model_size)
  params = bench.maskclip_abstract_params(model, model_size or IMAGE, MASKS)
  xla = bench.compiled_flops(fn, params, images, logits)
  analytic = bench.maskclip_analytic_flops(tower, IMAGE, MASKS, rma_layers, model_size)
  assert (analytic['rma'] > 0) == bool(rma_layers)
  assert (analytic['input_resize'] > 0) == (model_size is not None)
  assert 1.0 <= xla / analytic['total'] <= 1.08
  assert analytic['total_visible'] < analytic['total']  # no one attends to a mask token
