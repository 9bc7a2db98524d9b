"""Patch-DM's global codes: the code table started from CLIP image embeddings,
the jointly trained semantic encoder, and the trainer's `load_pretrained` hook
(fresh start only). Tiny models; CLIP weights are random, written by open_clip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from tests.helpers import import_open_clip
from tests.helpers import random_params
from visgen_jax.convert import clip as clip_convert
from visgen_jax.data import pipeline
from visgen_jax.diffusion import schedules
from visgen_jax.errors import UserError
from visgen_jax.models import clip as clip_lib
from visgen_jax.models.latent_mlp import latent_loss
from visgen_jax.systems import System, get_system, patchdm
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

TINY = 'configs/patchdm_1k.py:tiny'  # 32x64 images, 32-d codes


@pytest.fixture(scope='module')
def clip_file(tmp_path_factory):
  """(path, torch model): an open_clip CLIP with the 'tiny' preset's architecture, saved as .bin."""
  import torch
  open_clip = import_open_clip()
  torch.manual_seed(0)
  v, t = clip_lib.CLIP_PRESETS['tiny']['vision'], clip_lib.CLIP_PRESETS['tiny']['text']
  model = open_clip.model.CLIP(
      embed_dim=clip_lib.CLIP_PRESETS['tiny']['embed_dim'],
      vision_cfg=dict(image_size=v['image_size'], patch_size=v['patch_size'], width=v['width'],
                      layers=v['layers'], head_width=v['width'] // v['heads']),
      text_cfg={k: t[k] for k in ('context_length', 'vocab_size', 'width', 'heads', 'layers')}).eval()
  path = tmp_path_factory.mktemp('clip') / 'tiny_clip.bin'
  torch.save(model.state_dict(), path)
  return str(path), model


def test_clip_preprocess_is_open_clips_evaluation_transform():
  open_clip = import_open_clip()
  transform = open_clip.image_transform(32, is_train=False)
  rng = np.random.default_rng(0)
  for h, w in ((40, 72), (96, 50), (32, 64), (20, 20)):
    pixels = rng.integers(0, 256, (h, w, 3), np.uint8)
    ours = clip_lib.preprocess(pixels[None] / 127.5 - 1, 32)[0]
    ours = ((ours + 1) / 2 - np.array(clip_lib.CLIP_MEAN)) / np.array(clip_lib.CLIP_STD)
    ref = transform(Image.fromarray(pixels)).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5, err_msg=f'{h}x{w}')


def test_clip_init_puts_the_clip_embedding_of_image_i_in_row_i(clip_file):
  import torch
  path, torch_model = clip_file
  config = config_lib.load_config(TINY, ['codes.init=clip', f'codes.clip_checkpoint={path}',
                                         'codes.clip_preset=tiny', 'codes.num=120'])
  system = get_system(config)
  unet = object()
  table = np.asarray(system.load_pretrained({'unet': unet, 'codes': jnp.zeros((120, 32))})['codes'])
  assert table.shape == (120, 32)

  # Independently: the stored images (32x64), their centre 32x32 crops (CLIP's transform at the
  # tiny tower's 32² is the crop alone), through the tower with the converted weights.
  source, info = pipeline.make_dataset_source(config.data)
  assert info.num_examples == 114
  crops = np.stack([source[i]['image'][:, 16:48] for i in range(info.num_examples)]) / 127.5 - 1
  tower = clip_lib.vision_tower('tiny')
  visual = clip_convert.load_clip_checkpoint(path, 'tiny')[1]['visual']
  expected = np.asarray(jax.jit(lambda x: tower.apply({'params': visual}, x))(crops))
  np.testing.assert_allclose(table[:114], expected, rtol=0, atol=1e-5)
  assert np.abs(expected[0] - expected[1]).max() > 1e-2  # rows really differ
  # ... and what open_clip itself says for two of them.
  normalised = ((crops[[0, 113]] + 1) / 2 - np.array(clip_lib.CLIP_MEAN)) / np.array(clip_lib.CLIP_STD)
  with torch.no_grad():
    ref = torch_model.encode_image(torch.from_numpy(normalised.transpose(0, 3, 1, 2)).float()).numpy()
  np.testing.assert_allclose(table[[0, 113]], ref, rtol=0, atol=1e-4 * np.abs(ref).max())
  # Rows with no image keep a N(0, 1) start.
  assert 0.5 < table[114:].std() < 1.5


@pytest.mark.parametrize('overrides, words', [
    (['codes.init=clip', 'codes.clip_checkpoint=CLIP'], ['code_dim=32', '512']),
    (['codes.init=clip', 'codes.clip_checkpoint=CLIP', 'codes.clip_preset=tiny', 'model.code_dim=16'],
     ['code_dim=16', '32']),
    (['codes.init=clip', 'codes.clip_checkpoint=CLIP', 'codes.clip_preset=ViT-B-17'],
     ['config.codes.clip_preset', 'ViT-B-17', 'unknown']),
    (['codes.init=clip'], ['clip_checkpoint']),
    (['codes.init=clip', 'codes.clip_checkpoint=/no/such.pt'], ['clip_checkpoint', '/no/such.pt']),
    (['codes.init=pca'], ['codes.init', 'pca']),
    (['codes.source=vae'], ['codes.source', 'vae']),
    (['codes.source=encoder', 'latent.znormalize=true'], ['latent.znormalize=false']),
    (['codes.source=encoder', 'codes.init=clip'], ['codes.init']),
    (['codes.source=encoder', 'latent.enabled=false'], ['latent.enabled']),
    (['codes.source=encoder', 'sample.code_index=0,1'], ['code_index']),
    (['codes.source=encoder', 'codes.encoder.size=17,32'], ['config.codes.encoder', '(17, 32)', 'divisible by 2']),
    (['codes.source=encoder', 'codes.encoder.size=12,32'],
     ['config.codes.encoder', 'attention_resolutions=(8,)', '12, 6']),
])
def test_bad_code_settings_are_user_errors(clip_file, overrides, words):
  overrides = [o.replace('=CLIP', '=' + clip_file[0]) for o in overrides]
  with pytest.raises(UserError) as e:
    patchdm.validate(config_lib.load_config(TINY, overrides))
  for word in words:
    assert word in str(e.value)


def test_encoder_codes_train_with_the_unet_and_sampling_draws_latent_codes():
  # One-level UNet and encoder, no dropout in the UNet: short compiles.
  config = config_lib.load_config('configs/patchdm_256.py:tiny', [
      'sampler.steps=2', 'latent.sample_steps=2', 'model.channel_mult=1', 'model.attention_resolutions=16',
      'model.dropout=0', 'codes.encoder.channel_mult=1', 'codes.encoder.attention_resolutions=16'])
  assert config.codes.source == 'encoder' and tuple(config.codes.encoder.size) == (16, 16)
  system = get_system(config)
  assert system.load_pretrained is None
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  batch = {'image': images, 'index': jnp.arange(4, dtype=jnp.int32)}
  params = random_params(jax.eval_shape(system.init, jax.random.key(0), batch))
  assert set(params) == {'unet', 'encoder', 'latent'}
  assert params['encoder']['out_proj']['kernel'].shape == (32, 32)  # 32 channels → a 32-d code

  # The UNet's loss reaches the encoder through the codes (gradients of the encoder only, to
  # keep the compile small).
  loss_of_encoder = lambda e: system.loss_fn(dict(params, encoder=e), batch, jax.random.key(2))
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_of_encoder, has_aux=True))(params['encoder'])
  assert np.isfinite(float(loss)) and np.isfinite(float(metrics['latent_l1']))
  assert float(optax.tree.norm(grads)) > 1e-6
  # The latent DPM learns the batch's codes, one loss per code, through stop_gradient.
  codes = jnp.asarray(np.random.default_rng(5).normal(size=(4, 32)), jnp.float32)
  latent, base = patchdm.make_latent(config), schedules.make_schedule('const0.008', 1000)
  per_code = lambda c: latent_loss(latent, base, params['latent'], c, jax.random.key(4),
                                           batch_size=None, znormalize=False)
  (_, losses), to_codes = jax.jit(jax.value_and_grad(lambda c: (per_code(c).sum(), per_code(c)),
                                                     has_aux=True))(codes)
  assert losses.shape == (4,) and not np.asarray(to_codes).any()

  samples = system.sample(params, jax.random.key(3))
  assert samples.shape == (2, 32, 32, 3) and bool(jnp.isfinite(samples).all())


def test_paper_encoder_is_diffae_half_unet_at_256():
  """Five levels of 64 x (1, 2, 4, 8, 8) channels, two ResBlocks each, attention only at 16x16 and
  in the middle, a 512-d code from the pooled 512 channels (shapes only, nothing compiled)."""
  config = config_lib.load_config('configs/patchdm_256.py', [])
  assert tuple(config.codes.encoder.size) == (256, 256) and not config.latent.znormalize
  encoder = patchdm.make_encoder(config)
  params = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))['params']
  assert sorted(k for k in params if k.endswith('_attn')) == ['input_blocks_13_attn', 'input_blocks_14_attn']
  assert {k for k in params if k.endswith('_down')} == {f'input_blocks_{i}_down' for i in (3, 6, 9, 12)}
  assert 'middle_block_1' in params and 'output_blocks_0_res' not in params
  assert params['input_blocks_10_res']['in_conv']['kernel'].shape == (3, 3, 256, 512)
  assert params['out_proj']['kernel'].shape == (512, 512)
  # A larger image's shorter side is scaled to 256.
  assert tuple(config_lib.load_config('configs/patchdm_1k.py', []).codes.encoder.size) == (256, 512)


def test_trainer_applies_load_pretrained_on_a_fresh_start_and_not_on_resume(tmp_path, monkeypatch):
  config = config_lib.load_config(TINY, ['sample_every=0', 'log_every=1', 'ckpt_every=1', 'total_steps=1'])
  calls = []

  def load_pretrained(params):
    calls.append(params)
    # A different value each call: a second application would show.
    return dict(params, w=np.full(3, len(calls), np.float32))

  # A system of two vectors: the test is about the trainer, not a model.
  system = System(init=lambda key, batch: {'w': jnp.zeros(3), 'v': jnp.full(2, 7.0)},
                  loss_fn=lambda p, batch, key: (jnp.sum(p['w'] ** 2) + jnp.sum(p['v'] ** 2), {}),
                  load_pretrained=load_pretrained)
  monkeypatch.setattr(trainer, 'get_system', lambda c: system)
  workdir = str(tmp_path / 'run')
  state = trainer.train(config, workdir)
  assert len(calls) == 1
  shardings = trainer.setup(config).state_shardings
  for tree in ('params', 'ema_params'):
    np.testing.assert_allclose(state[tree]['w'], 1.0, atol=1e-3)  # loaded, then one Adam step of 1e-4
    np.testing.assert_allclose(state[tree]['v'], 7.0, atol=1e-3)  # as initialised
    assert state[tree]['w'].sharding == shardings[tree]['w']
  assert float(state['params']['w'][0]) < 1.0  # the step did train the loaded value

  config.total_steps = 2
  state = trainer.train(config, workdir)
  assert len(calls) == 1  # resumed: nothing loaded
  np.testing.assert_allclose(state['params']['w'], 1.0, atol=1e-3)
