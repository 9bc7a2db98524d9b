"""MaskCLIP's model: mask class tokens (Eq. 2.1/2.2), RMA (Eq. 2.3–2.5), the CLIP-crop baseline.

A tiny QuickGELU CLIP (4 blocks, 4x4 patches of 8 px, RMA after blocks 2 and 4)
with random weights, checked against a float64 numpy reference written from the
equations, and for the properties the attention mask promises.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from visgen_jax.convert.clip import abstract_params
from visgen_jax.models import clip as clip_lib
from visgen_jax.models.maskclip import MaskCLIP, clip_crop_features

PRESET = 'tiny-quickgelu'
B, M, SIZE, PATCH, GRID = 2, 3, 32, 8, 4


def _random_params(abstract, seed=0):
  """Random float32 params of the given shapes with O(1) activations (no jitted init needed)."""
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    shape = leaf.shape
    if path[-1] == 'scale':
      value = 1 + 0.1 * rng.randn(*shape)
    elif path[-1] == 'bias':
      value = 0.1 * rng.randn(*shape)
    elif path[-1] in ('kernel', 'proj'):
      value = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
    else:  # class and position embeddings
      value = 0.5 * rng.randn(*shape)
    return value.astype(np.float32)

  flat = flax.traverse_util.flatten_dict(abstract)
  return flax.traverse_util.unflatten_dict({p: draw(p, leaf) for p, leaf in flat.items()})


@functools.cache
def _setup(use_rma=True, impl='xla', layers=4):
  """(model, params, jitted forward). Variants with the same layer count share the CLIP weights."""
  tower = clip_lib.vision_tower(PRESET, attention_impl=impl, layers=layers)
  model = MaskCLIP(tower, rma_layers=(2, 4) if layers == 4 else (1,), use_rma=use_rma)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)),
                            jnp.zeros((1, 1, SIZE, SIZE)))['params']
  params = {'clip': _random_params(abstract['clip'], seed=layers)}
  if use_rma:
    params['rma'] = _random_params(abstract['rma'], seed=layers + 1)
  forward = jax.jit(lambda p, images, masks: model.apply({'params': p}, images, masks))
  return model, params, forward


@functools.cache
def _clip_embed():
  """The plain CLIP image embedding of the 4-block tower (jitted once)."""
  model, params, _ = _setup(use_rma=False)
  return functools.partial(jax.jit(model.clip.apply), {'params': params['clip']})


def _inputs(seed=0):
  """Images and mask logits whose masks cover parts of patches (8x8 blocks of 4 px) plus an
  empty mask (batch 0, mask 2)."""
  rng = np.random.RandomState(seed)
  images = rng.uniform(-1, 1, (B, SIZE, SIZE, 3)).astype(np.float32)
  masks = 4 * np.kron(rng.randn(B, M, 8, 8), np.ones((4, 4))) + rng.randn(B, M, SIZE, SIZE)
  masks[0, 2] = -5.0
  return images, masks.astype(np.float32)


# ---- float64 numpy reference, written from the equations ----

def _ln(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * p['scale'] + p['bias']


def _quick_gelu(x):
  return x / (1 + np.exp(-1.702 * x))


def _dense(x, p):
  return x @ p['kernel'] + p['bias']


def _patch_rows(x):
  """[B, H, W, C] → [B, N, P·P·C]: row-major patches, each flattened (i, j, c)."""
  rows = [x[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].reshape(x.shape[0], -1)
          for r in range(GRID) for c in range(GRID)]
  return np.stack(rows, axis=1)


def _reference(params, images, masks, rma_layers, heads=2):
  """(embeddings, refined masks) of MaskCLIP, float64, straight from Eq. 2.1–2.5."""
  f64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
  clip, rma = f64(params['clip']), f64(params.get('rma', {}))
  images, logits = np.asarray(images, np.float64), np.asarray(masks, np.float64)
  b, m = logits.shape[:2]
  width = clip['class_embedding'].shape[0]
  d = width // heads
  pixels = ((images + 1) / 2 - np.array(clip_lib.CLIP_MEAN)) / np.array(clip_lib.CLIP_STD)
  x = _patch_rows(pixels) @ clip['conv1']['kernel'].reshape(-1, width)
  n = x.shape[1]
  x = np.concatenate([np.broadcast_to(clip['class_embedding'], (b, 1, width)), x], 1)
  x = _ln(x + clip['positional_embedding'], clip['ln_pre'])
  x = np.concatenate([np.repeat(x[:, :1], m, axis=1), x], axis=1)  # mask tokens = class copies
  refined = []
  for i in range(len([k for k in clip if k.startswith('resblocks_')])):
    block = clip[f'resblocks_{i}']
    # Eq. 2.1: nobody sees mask tokens; all see the class; mask token m sees the patches
    # its binarised mask touches (max over the patch).
    allowed = np.zeros((b, m + 1 + n, m + 1 + n), bool)
    allowed[:, m:, m:] = True
    allowed[:, :m, m] = True
    allowed[:, :m, m + 1:] = _patch_rows((logits >= 0).reshape(b * m, *logits.shape[2:], 1)
                                         ).reshape(b, m, n, -1).any(-1)
    h = _ln(x, block['ln_1'])
    q, k, v = np.split(_dense(h, block['in_proj']).reshape(b, -1, 3, heads, d), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    s = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(d)
    rma_j = rma_layers.index(i + 1) if rma and i + 1 in rma_layers else None
    if rma_j is not None:
      layer = rma[f'layers_{rma_j}']
      # Eq. 2.3/2.4: mean of CLIP's logit and q'·k' on the mask-token × patch block.
      tokens = (_patch_rows(np.tanh(logits).reshape(b * m, *logits.shape[2:], 1))
                @ layer['patchify']['kernel'].reshape(-1, width) + layer['patchify']['bias'])
      q_mask = _ln(tokens, layer['query_norm']).reshape(b, m, n, heads, d)
      k_mask = _dense(h[:, m + 1:], layer['key_proj']).reshape(b, n, heads, d)
      extra = np.einsum('bmnhd,bnhd->bhmn', q_mask, k_mask) / np.sqrt(d)
      s[:, :, :m, m + 1:] = (s[:, :, :m, m + 1:] + extra) / 2
    s = np.where(allowed[:, None], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out = np.einsum('bhts,bshd->bthd', a, v).reshape(b, -1, width)
    x = x + _dense(out, block['out_proj'])
    x = x + _dense(_quick_gelu(_dense(_ln(x, block['ln_2']), block['c_fc'])), block['c_proj'])
    if rma_j is not None:
      # Eq. 2.5: interaction → QuickGELU → 1x1 conv to P² channels → pixel shuffle.
      inter = (q[:, :m, None] / np.sqrt(d)) * k[:, None, m + 1:]
      res = _dense(_quick_gelu(inter.reshape(b, m, n, width)), layer['refine'])
      res = res.transpose(0, 1, 3, 2).reshape(b, m, PATCH, PATCH, GRID, GRID)
      logits = logits + res.transpose(0, 1, 4, 2, 5, 3).reshape(logits.shape)
      refined.append(logits)
  return _ln(x[:, :m], clip['ln_post']) @ clip['proj'], refined


def _close(out, ref, tol=1e-5):
  out, ref = np.asarray(out), np.asarray(ref)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=0, atol=tol * max(np.abs(ref).max(), 1.0))


@pytest.mark.parametrize('use_rma', [True, False])
def test_matches_reference(use_rma):
  _, params, forward = _setup(use_rma)
  images, masks = _inputs()
  emb, refined = forward(params, images, masks)
  ref_emb, ref_refined = _reference(params, images, masks, (2, 4))
  assert np.isfinite(emb).all()  # the empty mask included
  _close(emb, ref_emb)
  assert len(refined) == (2 if use_rma else 0)
  for out, ref in zip(refined, ref_refined):
    assert out.shape == masks.shape and out.dtype == jnp.float32
    _close(out, ref)


def test_mask_covering_everything_without_rma_is_the_clip_embedding():
  _, params, forward = _setup(use_rma=False)
  images, masks = _inputs()
  masks[:, 0] = 5.0
  emb, refined = forward(params, images, masks)
  _close(emb[:, 0], _clip_embed()(images))
  assert refined == ()
  assert set(params) == {'clip'}


def test_mask_tokens_do_not_see_each_other():
  _, params, forward = _setup()
  images, masks = _inputs()
  others = _inputs(seed=1)[1]
  # Mask 0 moves to position 1 among two different masks.
  swapped = np.stack([others[:, 0], masks[:, 0], others[:, 2]], axis=1)
  emb, refined = forward(params, images, masks)
  emb2, refined2 = forward(params, images, swapped)
  _close(emb2[:, 1], emb[:, 0], 1e-6)
  for a, b in zip(refined, refined2):
    _close(b[:, 1], a[:, 0], 1e-6)
  assert np.abs(emb2[:, 0] - emb[:, 0]).max() > 1e-3  # other masks do get other embeddings


def test_after_one_block_a_mask_token_ignores_pixels_outside_its_mask():
  """With one block, a mask token has seen only the class token (which has not yet seen any
  patch) and its own patches: pixels of other patches cannot change its embedding."""
  _, params, forward = _setup(layers=1)
  images, _ = _inputs()
  masks = np.full((B, M, SIZE, SIZE), -4.0, np.float32)
  masks[:, :, 3:12, 2:9] = 4.0  # touches patches (0, 0), (0, 1), (1, 0), (1, 1)
  emb = forward(params, images, masks)[0]
  outside = images.copy()
  outside[:, 16:, :] = -outside[:, 16:, :]
  outside[:, :16, 16:] = 0.3
  _close(forward(params, outside, masks)[0], emb, 1e-6)
  inside = images.copy()
  inside[:, 14, 14] = -inside[:, 14, 14]  # an untouched pixel of a touched patch
  assert np.abs(forward(params, inside, masks)[0] - emb).max() > 1e-4


def test_empty_masks_are_finite():
  """Without RMA an empty mask stays empty in every block (the class token is its only key)."""
  images, masks = _inputs()
  masks[:] = -3.0
  for use_rma in (False, True):
    _, params, forward = _setup(use_rma)
    emb, refined = forward(params, images, masks)
    assert np.isfinite(emb).all() and all(np.isfinite(r).all() for r in refined)
  _, params, forward = _setup(False)
  none = forward(params, images, masks[:, :0])[0]
  assert none.shape == (B, 0, 32)


def test_pallas_matches_xla():
  _, params, forward = _setup()
  _, _, forward_pallas = _setup(impl='pallas')
  images, masks = _inputs()
  emb, refined = forward(params, images, masks)
  emb_p, refined_p = forward_pallas(params, images, masks)
  _close(emb_p, emb)
  for a, b in zip(refined_p, refined):
    _close(a, b)


def test_gradients_reach_every_rma_param_and_only_rma_params_train():
  model, params, _ = _setup()
  images, masks = _inputs()
  target = (np.random.RandomState(2).rand(*masks.shape) > 0.5).astype(np.float32)

  def loss(rma, clip):
    emb, refined = model.apply({'params': {'clip': clip, 'rma': rma}}, images, masks)
    bce = sum(optax.sigmoid_binary_cross_entropy(r, target).mean() for r in refined)
    return jnp.mean(emb**2) + bce

  grads = jax.jit(jax.grad(loss))(params['rma'], params['clip'])
  for path, g in flax.traverse_util.flatten_dict(grads).items():
    assert np.isfinite(g).all() and np.abs(g).max() > 0, path



def test_clip_params_are_the_vision_tower_params():
  model, params, _ = _setup()
  shapes = lambda tree: {k: np.shape(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}
  assert shapes(abstract_params(model.clip)) == shapes(params['clip'])
  assert sorted(params['rma']) == ['layers_0', 'layers_1']


def test_clip_crop_features():
  model, params, _ = _setup(use_rma=False)
  tower, clip_params = model.clip, params['clip']
  images, _ = _inputs()
  masks = np.full((B, 4, SIZE, SIZE), -1.0, np.float32)
  masks[:, 0] = 1.0  # everything: the crop is the image itself
  masks[:, 2, 4:20, 8:24] = 1.0  # a 16x16 box
  masks[:, 3, 4:20, 8:24] = 1.0
  masks[:, 3, 10, 12] = -1.0  # ... with a hole
  both_fills = lambda p, i, m: (clip_crop_features(tower, p, i, m),
                                clip_crop_features(tower, p, i, m, fill='zero'))
  crop = jax.jit(both_fills)
  features, zero_filled = crop(clip_params, images, masks)
  assert features.shape == (B, 4, 32) and np.isfinite(features).all()
  _close(features[:, 0], _clip_embed()(images))
  # Mask 1 is empty: the whole image becomes CLIP's mean colour.
  mean_image = np.broadcast_to(2 * np.array(clip_lib.CLIP_MEAN, np.float32) - 1, images.shape)
  _close(features[:, 1], _clip_embed()(mean_image))
  # Pixels outside a mask do not matter; the hole's pixel does; so does the fill.
  changed = images.copy()
  changed[:, 24:] = 0.9
  changed[:, :, :4] = -0.9
  _close(crop(clip_params, changed, masks)[0][:, 2:], features[:, 2:], 1e-6)
  assert np.abs(features[:, 3] - features[:, 2]).max() > 1e-4
  assert np.abs(zero_filled[:, 3] - features[:, 3]).max() > 1e-4


def test_bad_input():
  model, params, forward = _setup()
  images, masks = _inputs()
  with pytest.raises(ValueError, match='mask logits must be'):
    model.apply({'params': params}, images, masks[:, :, :16])
  with pytest.raises(ValueError, match='multiple of the patch size'):
    model.apply({'params': params}, images[:, :30], masks[:, :, :30])
  for layers in ((0, 2), (2, 5), (4, 2)):
    bad = MaskCLIP(model.clip, rma_layers=layers)
    with pytest.raises(ValueError, match='rma_layers'):
      bad.apply({'params': params}, images, masks)
  with pytest.raises(ValueError, match='fill='):
    clip_crop_features(model.clip, params['clip'], images, masks, fill='grey')
