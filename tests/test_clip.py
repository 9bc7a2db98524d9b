"""Flax CLIP vs open_clip with shared random weights; converters, checkpoint files, CLI.

Tolerance of the parity tests: max |flax − torch| ≤ 1e-4 · max |torch| over each
embedding array (float32, CPU).
"""

import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import import_open_clip
from visgen_jax.convert import clip as clip_convert
from visgen_jax.errors import UserError
from visgen_jax.models import clip as clip_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ['a photo of a cat', 'Hello, World!! (punctuation) & ünïcödé — ok?', 'word ' * 100, '']
# A small architecture whose heads are width // 64, so it can be read off its weights.
SMALL = dict(embed_dim=64, act='quick_gelu',
             vision=dict(image_size=32, patch_size=8, width=128, layers=2, heads=2),
             text=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2))


def _assert_parity(out, ref):
  out, ref = np.asarray(out), np.asarray(ref)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def _torch_images(images):
  """The [-1, 1] NHWC images as open_clip expects them: NCHW, CLIP-normalised."""
  import torch
  pixels = ((images + 1) / 2 - np.array(clip_lib.CLIP_MEAN)) / np.array(clip_lib.CLIP_STD)
  return torch.from_numpy(pixels.astype(np.float32).transpose(0, 3, 1, 2))


def _embeddings(model, params, images, tokens):
  both = lambda m, i, t: (m.encode_image(i), m.encode_text(t))
  return jax.jit(lambda p, i, t: model.apply({'params': p}, i, t, method=both))(
      params, images, tokens)


def _parity(torch_model, model, params, image_size, open_clip):
  import torch
  images = np.random.RandomState(0).uniform(-1, 1, (2, image_size, image_size, 3))
  images = images.astype(np.float32)
  tokens = open_clip.get_tokenizer('ViT-B-16')(TEXTS)
  with torch.no_grad():
    ref_image = torch_model.encode_image(_torch_images(images)).numpy()
    ref_text = torch_model.encode_text(tokens).numpy()
  image, text = _embeddings(model, params, images, tokens.numpy())
  _assert_parity(image, ref_image)
  _assert_parity(text, ref_text)
  np.testing.assert_allclose(params['logit_scale'], torch_model.logit_scale.item(), rtol=1e-6)


def _small_open_clip(open_clip, seed=0):
  """open_clip's CLIP with QuickGELU at SMALL's sizes, weights rounded to float16 (OpenAI style)."""
  import torch
  torch.manual_seed(seed)
  v, t = SMALL['vision'], SMALL['text']
  model = open_clip.model.CLIP(
      embed_dim=SMALL['embed_dim'], quick_gelu=True,
      vision_cfg=dict(image_size=v['image_size'], patch_size=v['patch_size'], width=v['width'],
                      layers=v['layers'], head_width=v['width'] // v['heads']),
      text_cfg={k: t[k] for k in ('context_length', 'vocab_size', 'width', 'heads', 'layers')})
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.half().float())
  return model.eval()


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_vit_b16_parity_with_open_clip():
  """open_clip's 'ViT-B-16' (exact GELU) at 224², batch 2, converted from its state dict."""
  open_clip = import_open_clip()
  torch_model = open_clip.create_model_and_transforms('ViT-B-16', pretrained=None)[0].eval()
  model = clip_lib.clip_model('ViT-B-16')
  params = clip_convert.convert_clip_state_dict(_state_dict(torch_model), model)
  _parity(torch_model, model, params, 224, open_clip)


def test_quickgelu_parity_from_openai_style_files(tmp_path):
  """A QuickGELU CLIP read from a TorchScript archive (as OpenAI ships), .safetensors and .bin."""
  import torch
  open_clip = import_open_clip()
  torch_model = _small_open_clip(open_clip)
  scripted = torch.jit.trace_module(torch_model, {'encode_image': (torch.zeros(1, 3, 32, 32),)},
                                    check_trace=False)
  torch.jit.save(scripted, tmp_path / 'openai.pt')
  config, params = clip_convert.load_clip_checkpoint(str(tmp_path / 'openai.pt'))
  assert config == SMALL  # architecture read off the shapes, QuickGELU for OpenAI's archives
  _parity(torch_model, clip_lib.clip_model(config), params, 32, open_clip)

  half = {k: v.half() for k, v in torch_model.state_dict().items()}
  safetensors = pytest.importorskip('safetensors.torch')
  safetensors.save_file(half, tmp_path / 'model.safetensors')
  torch.save({'state_dict': {'module.' + k: v for k, v in half.items()}, 'epoch': 3},
             tmp_path / 'model.bin')
  for name in ('model.safetensors', 'model.bin'):
    again = clip_convert.load_clip_checkpoint(str(tmp_path / name), act='quick_gelu')[1]
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_position_embedding_resize_matches_torch_and_is_identity_at_native_grid():
  import torch
  rng = np.random.RandomState(0)
  pos = rng.randn(1 + 4 * 4, 8).astype(np.float32)
  assert clip_lib.resize_position_embedding(pos, (4, 4)) is pos
  np.testing.assert_array_equal(clip_lib.bicubic_matrix(4, 4), np.eye(4))
  for grid in ((7, 5), (3, 2)):
    grid_t = torch.from_numpy(pos[1:]).reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid_t, size=grid, mode='bicubic', align_corners=False)
    ref = np.concatenate([pos[:1], ref.permute(0, 2, 3, 1).reshape(-1, 8).numpy()])
    np.testing.assert_allclose(clip_lib.resize_position_embedding(pos, grid), ref, atol=1e-5)

  tower = clip_lib.vision_tower('tiny')
  params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32),
                        clip_convert.abstract_params(tower))
  images = jnp.asarray(rng.uniform(-1, 1, (1, 48, 40, 3)), jnp.float32)
  resized = jax.jit(lambda p, x: tower.apply({'params': p}, x, method='tokens'))(params, images)
  assert resized.shape == (1, 1 + 6 * 5, 64) and np.isfinite(resized).all()


def test_converter_errors():
  open_clip = import_open_clip()
  state_dict = _state_dict(_small_open_clip(open_clip))
  model = clip_lib.clip_model(SMALL)
  vision = clip_convert.convert_clip_state_dict(state_dict, clip_lib.vision_tower(SMALL))
  full = clip_convert.convert_clip_state_dict(state_dict, model)
  jax.tree.map(np.testing.assert_array_equal, vision, full['visual'])
  text = clip_convert.convert_clip_state_dict(state_dict, clip_lib.text_tower(SMALL))
  jax.tree.map(np.testing.assert_array_equal, text, full['text'])

  missing = {k: v for k, v in state_dict.items() if k != 'visual.ln_post.weight'}
  with pytest.raises(UserError, match='1 params with no key .*visual/ln_post/scale'):
    clip_convert.convert_clip_state_dict(missing, model)
  with pytest.raises(UserError, match='1 keys with no counterpart .*visual.extra'):
    clip_convert.convert_clip_state_dict({**state_dict, 'visual.extra': np.zeros(2)}, model)
  with pytest.raises(UserError, match='not an OpenAI/open_clip ViT CLIP of this preset: .*keys of another shape'):
    clip_convert.convert_clip_state_dict(state_dict, clip_lib.clip_model('tiny'))
  with pytest.raises(ValueError, match='CLIP preset .*unknown'):
    clip_lib.clip_model('ViT-B-17')
  with pytest.raises(ValueError, match='act=.*unknown'):
    clip_convert.abstract_params(clip_lib.vision_tower(SMALL, act='relu'))
  with pytest.raises(ValueError, match='multiple of the patch size'):
    clip_lib.vision_tower(SMALL).apply({'params': vision}, jnp.zeros((1, 30, 32, 3)))


def test_checkpoint_file_errors(tmp_path):
  import torch
  import_open_clip()
  with pytest.raises(UserError, match='does not exist'):
    clip_convert.load_clip_checkpoint(str(tmp_path / 'none.pt'), 'tiny')
  (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
  with pytest.raises(UserError, match='cannot be read with torch.load'):
    clip_convert.load_clip_checkpoint(str(tmp_path / 'junk.pt'), 'tiny')
  torch.save({'visual.proj': torch.zeros(2, 2)}, tmp_path / 'plain.pt')
  with pytest.raises(UserError, match='activation is not stored'):
    clip_convert.load_clip_checkpoint(str(tmp_path / 'plain.pt'))
  with pytest.raises(UserError, match='has no visual.conv1.weight'):
    clip_convert.load_clip_checkpoint(str(tmp_path / 'plain.pt'), act='gelu')


def test_cli_round_trip(tmp_path):
  """--kind=clip on a .safetensors file (read without torch), architecture inferred."""
  open_clip = import_open_clip()
  ocp = pytest.importorskip('orbax.checkpoint')
  safetensors = pytest.importorskip('safetensors.torch')
  torch_model = _small_open_clip(open_clip)
  safetensors.save_file(torch_model.state_dict(), tmp_path / 'model.safetensors')
  output = tmp_path / 'params'
  env = {**os.environ, 'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
         'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-m', 'visgen_jax.convert', '--kind=clip',
                           f'--input={tmp_path / "model.safetensors"}', f'--output={output}',
                           '--act=quick_gelu'], capture_output=True, text=True, env=env, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.strip().splitlines()[-1])['config'] == SMALL
  restored = ocp.StandardCheckpointer().restore(output)
  expected = clip_convert.convert_clip_state_dict(_state_dict(torch_model),
                                                  clip_lib.clip_model(SMALL))
  assert (flax.traverse_util.flatten_dict(restored).keys()
          == flax.traverse_util.flatten_dict(expected).keys())
  jax.tree.map(np.testing.assert_array_equal, restored, expected)


def test_pallas_attention_without_mask_tokens_matches_xla():
  """attention_impl='pallas' runs the mask-token kernel with no mask tokens: plain attention."""
  q, k, v = np.random.RandomState(0).randn(3, 2, 17, 2, 32).astype(np.float32)
  pallas = clip_lib.vision_tower('tiny', attention_impl='pallas').attend(q, k, v)
  np.testing.assert_allclose(pallas, clip_lib.vision_tower('tiny').attend(q, k, v), atol=1e-6)
