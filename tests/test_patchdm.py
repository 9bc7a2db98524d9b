"""Patch-DM: feature collage, the patch UNet's locality, the windowed loss,
the streaming sampler, the latent DPM over codes, any-size sampling, bad
input, and the CLI end to end (tiny models)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from tests.helpers import random_params, run_main
from visgen_jax.errors import UserError
from visgen_jax.kernels.collage import collage, collage_band
from visgen_jax.data import pipeline
from visgen_jax.diffusion import schedules
from visgen_jax.models.latent_mlp import LatentMLP, latent_loss, sample_codes
from visgen_jax.models.patch_unet import (
    PatchUNet, collage_denoiser, from_patches, grid_positions, streaming_denoiser, to_patches, window_losses)
from visgen_jax.systems import get_system, patchdm
from visgen_jax.train import checkpoint, sharding, trainer, weights
from visgen_jax.train import config as config_lib

TINY = 'configs/patchdm_1k.py:tiny'


def collage_loop(features, grid, batch):
  """The definition, pixel by pixel: shifted patch (i, j) takes, at each pixel,
  the pixel of whichever of the four neighbours lies there."""
  p1, p2 = grid
  f = np.asarray(features).reshape(batch, p1, p2, *features.shape[1:])
  h, w = f.shape[3:5]
  out = np.zeros((batch, p1 - 1, p2 - 1, h, w, f.shape[-1]), f.dtype)
  for i in range(p1 - 1):
    for j in range(p2 - 1):
      for y in range(h):
        for x in range(w):
          gy, gx = i * h + h // 2 + y, j * w + w // 2 + x
          out[:, i, j, y, x] = f[:, gy // h, gx // w, gy % h, gx % w]
  return out.reshape(-1, h, w, f.shape[-1])


def test_collage_is_the_half_patch_shifted_copy_and_its_gradient_scatters_back():
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(2 * 3 * 4, 4, 6, 5)), jnp.float32)
  out = collage(feats, (3, 4), 2)
  np.testing.assert_array_equal(out, collage_loop(feats, (3, 4), 2))
  # Adjoint: every shifted pixel is a copy of exactly one source pixel; the
  # outer half-patch rim of the grid is read by nobody.
  weights = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  grad = jax.grad(lambda f: jnp.sum(collage(f, (3, 4), 2) * weights))(feats)
  ids = jnp.arange(feats.size, dtype=jnp.float32).reshape(feats.shape)
  expected = np.zeros(feats.size, np.float32)
  np.add.at(expected, np.asarray(collage(ids, (3, 4), 2)).astype(int).ravel(), np.asarray(weights).ravel())
  np.testing.assert_array_equal(grad, expected.reshape(feats.shape))
  assert float(jnp.abs(grad).sum()) > 0


def test_collage_band_equals_rows_of_the_full_collage():
  feats = jnp.asarray(np.random.default_rng(1).normal(size=(2 * 5 * 3, 4, 4, 2)), jnp.float32)
  full = collage(feats, (5, 3), 2).reshape(2, 4, 2, 4, 4, 2)
  band = collage_band(feats, (5, 3), 2, start=1, rows=2).reshape(2, 2, 2, 4, 4, 2)
  np.testing.assert_array_equal(band, full[:, 1:3])
  with pytest.raises(UserError, match='outside'):
    collage_band(feats, (5, 3), 2, start=3, rows=2)


@pytest.fixture(scope='module')
def unet_and_params():
  unet = PatchUNet(patch_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(8,), embed_dim=64, pos_channels=16, code_dim=8, dropout=0.0)
  x = jnp.zeros((1, 2, 2, 16, 16, 3))
  shapes = jax.eval_shape(lambda k: unet.init(k, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 2, 2, 2)),
                                              jnp.zeros((1, 8)), decode='both'), jax.random.key(0))['params']
  return unet, random_params(shapes)


def test_patch_unet_is_local_plain_patches_alone_and_collaged_patches_from_their_four_neighbours(unet_and_params):
  unet, params = unet_and_params
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(1, 2, 3, 16, 16, 3)), jnp.float32)
  t = jnp.array([321])
  pos = jnp.asarray(np.stack(np.meshgrid(np.arange(2.), np.arange(3.), indexing='ij'), -1)[None], jnp.float32)
  code = jnp.asarray(rng.normal(size=(1, 8)), jnp.float32)
  apply = jax.jit(lambda x, pos, decode: unet.apply({'params': params}, x, t, pos, code, decode=decode),
                  static_argnums=2)
  shifted, plain = apply(x, pos, 'both')
  assert shifted.shape == (1, 1, 2, 16, 16, 3) and plain.shape == (1, 2, 3, 16, 16, 3)
  # A plain patch is the same on its own (a 1x1 grid) as inside the grid.
  alone = apply(x[:, 1:2, 2:3], pos[:, 1:2, 2:3], 'plain')
  np.testing.assert_allclose(alone[0, 0, 0], plain[0, 1, 2], rtol=1e-4, atol=1e-4)
  # A collaged patch depends only on its 2x2 neighbours.
  sub, _ = apply(x[:, :, 1:3], pos[:, :, 1:3], 'both')
  np.testing.assert_allclose(sub[0, 0, 0], shifted[0, 0, 1], rtol=1e-4, atol=1e-4)
  # ... and really mixes them: changing the far-right column changes it.
  moved, _ = apply(x.at[:, :, 2].add(1.0), pos, 'both')
  assert float(jnp.abs(moved[0, 0, 1] - shifted[0, 0, 1]).max()) > 1e-3
  np.testing.assert_allclose(moved[0, 0, 0], shifted[0, 0, 0], rtol=1e-4, atol=1e-4)


def test_streaming_step_equals_the_all_at_once_step(unet_and_params):
  unet, params = unet_and_params
  # 4 patch rows, beyond the trained grid on both sides (masked positions), two images, CFG-style use_pos.
  pos, mask = grid_positions((4, 2), (2, 2), 'extend')
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 64, 32, 3)), jnp.float32)
  args = (x, jnp.array([5, 700]), jnp.asarray(rng.normal(size=(2, 8)), jnp.float32), jnp.array([1.0, 0.0]))
  whole = jax.jit(collage_denoiser(unet, params, pos, mask))(*args)
  assert float(jnp.abs(whole).mean()) > 0.1
  # Bands of one patch row: four bands, each carrying the previous band's last encoded row.
  np.testing.assert_array_equal(jax.jit(streaming_denoiser(unet, params, pos, mask, 1))(*args), whole)
  with pytest.raises(ValueError, match='band_rows=3 must divide the 4'):
    streaming_denoiser(unet, params, pos, mask, 3)


def test_latent_mlp_feeds_its_input_to_every_layer_and_depends_on_time():
  mlp = LatentMLP(code_dim=4, num_layers=4, hidden=16)
  params = jax.jit(mlp.init)(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32))['params']
  assert [params[f'layer_{k}']['kernel'].shape for k in range(4)] == [(4, 16), (20, 16), (20, 16), (20, 4)]
  assert 'layer_3_time' not in params and 'layer_3_norm' not in params  # the output layer is plain
  out = jax.jit(mlp.apply)({'params': params}, jnp.ones((2, 4)), jnp.array([0, 500]))
  assert out.shape == (2, 4) and float(jnp.abs(out[0] - out[1]).max()) > 1e-3


def test_latent_dpm_learns_a_code_table_and_samples_codes_like_it():
  # Two clusters, off-centre and narrow, so the z-normalisation and its inverse matter.
  centres = np.array([[3.0, -1.0, 0.5], [2.0, -1.0, 1.5]], np.float32)
  table = jnp.asarray(np.repeat(centres, 32, axis=0)
                      + 0.02 * np.random.default_rng(5).normal(size=(64, 3)), jnp.float32)
  mlp = LatentMLP(code_dim=3, num_layers=4, hidden=64)
  base = schedules.make_schedule('const0.008', 1000)
  params = jax.jit(mlp.init)(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1,), jnp.int32))['params']
  opt = optax.adam(2e-3)
  draw = jax.jit(lambda p: sample_codes(mlp, schedules.respace(base, 'ddim50'), p, table,
                                                jax.random.key(2), 256))

  @jax.jit
  def train(params, key):
    def step(carry, key):
      params, state = carry
      loss, grads = jax.value_and_grad(lambda p: latent_loss(mlp, base, p, table, key, batch_size=64)
                                       .mean())(params)
      updates, state = opt.update(grads, state)
      return (optax.apply_updates(params, updates), state), loss
    return jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, 800))

  def distance_to_nearest_centre(params):
    d = np.linalg.norm(np.asarray(draw(params))[:, None] - centres[None], axis=-1)
    return d.min(axis=1), np.bincount(d.argmin(axis=1), minlength=2)

  untrained, _ = distance_to_nearest_centre(params)
  (params, _), curve = train(params, jax.random.key(1))
  assert float(curve[-100:].mean()) < 0.6 * float(curve[:100].mean())
  trained, counts = distance_to_nearest_centre(params)
  assert np.median(untrained) > 0.5
  assert np.median(trained) < 0.15 and counts.min() > 256 // 5


def test_window_loss_ignores_the_padding_but_not_the_image():
  rng = np.random.default_rng(3)
  noise = jnp.asarray(rng.normal(size=(1, 8, 8, 3)), jnp.float32)
  inside = jnp.zeros((1, 8, 8, 1)).at[:, 2:, 2:].set(1.0)  # window at the top-left corner
  plain = to_patches(noise, 4)
  shifted = noise[:, 2:6, 2:6][:, None, None]
  assert [float(v[0]) for v in window_losses(shifted, plain, noise, inside)] == [0.0, 0.0]
  wrong_pad = plain.at[:, 0, 0, 0, 0].add(100.0)  # padding pixel (0, 0)
  assert float(window_losses(shifted, wrong_pad, noise, inside)[1][0]) == 0.0
  wrong_img = plain.at[:, 1, 1, 0, 0, 0].add(8.0)  # image pixel (4, 4)
  assert float(window_losses(shifted, wrong_img, noise, inside)[1][0]) == pytest.approx(64 / 192)


def test_grid_positions_interpolate_inside_and_extend_without_positions_outside():
  pos, mask = grid_positions((4, 8), (2, 4), 'interpolate')
  assert pos.shape == (5, 9, 2) and mask.all()
  np.testing.assert_allclose(pos[:, 0, 0], [0, 0.5, 1, 1.5, 2])
  pos, mask = grid_positions((4, 6), (2, 4), 'extend')
  np.testing.assert_array_equal(pos[:, 0, 0], [-1, 0, 1, 2, 3])
  np.testing.assert_array_equal(mask[:, 3], [0, 1, 1, 1, 0])
  with pytest.raises(ValueError, match='smaller than the trained'):
    grid_positions((1, 4), (2, 4), 'extend')
  with pytest.raises(ValueError, match='position dropout'):
    grid_positions((4, 6), (2, 4), 'extend', unconditional_positions=False)


def tiny_config(*overrides):
  return config_lib.load_config(TINY, overrides)


def test_sampling_at_a_size_never_trained_has_that_shape():
  config = tiny_config('sample.size=48,80', 'sampler.steps=2', 'sampler.guidance_scale=0.5')
  system = get_system(config)
  batch = {'image': jnp.zeros((4, 32, 64, 3)), 'index': jnp.zeros((4,), jnp.int32)}
  params = random_params(jax.eval_shape(system.init, jax.random.key(0), batch))
  images = system.sample(params, jax.random.key(1))
  assert images.shape == (2, 48, 80, 3) and bool(jnp.isfinite(images).all())
  np.testing.assert_array_equal(from_patches(to_patches(images, 16)), images)


@pytest.mark.parametrize('overrides, words', [
    (['data.resolution=40,64'], ['config.data.resolution', '40x64', 'divisible', '16']),
    (['sample.size=48,70'], ['config.sample.size', '48x70', 'divisible']),
    (['sample.size=16,32', 'sample.positions=extend'], ['config.sample.positions', 'smaller than the trained']),
    (['sample.size=64,96', 'sample.positions=extend', 'diffusion.pos_drop=0'],
     ['config.sample.positions', 'position dropout']),
    (['sample.positions=spread'], ['config.sample.positions', "'spread' is unknown"]),
    (['sample.code_index=0,99999'], ['code_index', '99999', 'out of range']),
    (['codes.num=1'], ['config.codes.num=1']),
    (['sample.stream_rows=3'], ['config.sample.stream_rows', 'band_rows=3', 'divide']),
    (['sample.stream_rows=1', 'sample.patch_mode=pixel_shift'], ['config.sample', "patch_mode='pixel_shift'"]),
    (['sample.patch_mode=feature'], ['config.sample', "'feature' is unknown"]),
    (['model.patch_size=10'], ['config.model', 'patch_size=10', 'half a patch']),
    (['model.attention_resolutions=5'], ['config.model', 'attention_resolutions contains 5']),
    (['latent.loss_type=huber'], ['latent.loss_type', 'huber']),
    (['latent.sample_steps=0'], ['latent.sample_steps']),
    (['latent.stage=third'], ['latent.stage', 'third']),
    (['latent.stage=second'], ['--config.init_from=<its workdir>', '--config.frozen=^(?!latent/)']),
])
def test_bad_input_is_a_user_error(overrides, words):
  with pytest.raises(UserError) as e:
    patchdm.validate(tiny_config(*overrides))
  for word in words:
    assert word in str(e.value)


def test_a_models_value_error_reaches_the_user_as_a_sentence_naming_the_key():
  # LatentMLP checks its depth when it is built (init, traced before anything is written).
  system = get_system(tiny_config('latent.num_layers=1'))
  batch = {'image': jnp.zeros((1, 32, 64, 3)), 'index': jnp.zeros((1,), jnp.int32)}
  with pytest.raises(UserError, match=r'^config\.latent: LatentMLP num_layers=1; it needs at least 2'):
    jax.eval_shape(system.init, jax.random.key(0), batch)


@pytest.mark.parametrize('size, what', [('32,32', 'covers everything'), ('16,64', 'larger than the canvas')])
def test_outpainting_an_input_that_fills_the_canvas_is_refused_before_writing(tmp_path, size, what):
  centre = tmp_path / 'centre.png'
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(centre)
  system = get_system(tiny_config(f'sample.size={size}', f'edit.input={centre}'))
  with pytest.raises(UserError, match=what):
    system.commands['outpaint'](None, jax.random.key(0), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_cli_trains_and_outpaints(tmp_path):
  workdir = tmp_path / 'run'
  # Without the latent DPM (tested on its own above and below): less to compile.
  no_latent = '--config.latent.enabled=false'
  run_main(f'--config={TINY}', f'--workdir={workdir}', '--config.total_steps=2', '--config.sample_every=0',
           '--config.ckpt_every=2', no_latent, check=True)
  assert (workdir / 'checkpoints' / '2').is_dir()
  centre = tmp_path / 'centre.png'
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(centre)
  run_main(f'--config={TINY}', f'--workdir={workdir}', '--mode=outpaint', '--config.sample.size=32,64',
           f'--config.edit.input={centre}', '--config.sampler.steps=2', no_latent, check=True)
  outs = sorted(os.listdir(workdir / 'outpaint'))
  assert outs == ['00000.png', '00001.png', 'grid.png']
  image = np.asarray(Image.open(workdir / 'outpaint' / outs[0]))
  assert image.shape == (32, 64, 3)
  np.testing.assert_array_equal(image[:, 16:48], 200)  # the known centre is kept exactly


def test_second_stage_trains_only_the_latent_dpm_on_the_first_runs_ema_weights(tmp_path, monkeypatch):
  # A first run's checkpoint without training it: random weights, EMA different from raw.
  first_config = tiny_config('latent.enabled=false')
  batch = {'image': jnp.zeros((1, 32, 64, 3)), 'index': jnp.zeros((1,), jnp.int32)}
  shapes = jax.eval_shape(get_system(first_config).init, jax.random.key(0), batch)
  first = {'params': random_params(shapes, seed=1), 'ema_params': random_params(shapes, seed=2)}
  saver = checkpoint.Checkpointer(str(tmp_path / 'first' / 'checkpoints'), 1)
  saver.save(5, first, {})
  saver.close()

  stage = ('latent.stage=second', f'init_from={tmp_path / "first"}', f'frozen={patchdm.SECOND_STAGE_FROZEN[0]}')
  second = tiny_config(*stage, 'total_steps=2', 'sample_every=0', 'optimizer.learning_rate=1e-2')
  # Its loss reads no batch: no image is decoded.
  monkeypatch.setattr(pipeline, 'make_train_iterator', lambda *a, **k: pytest.fail('the second stage read data'))
  state = jax.device_get(trainer.train(second, str(tmp_path / 'latent')))
  for name in ('unet', 'codes'):  # the first run's EMA weights, frozen: no EMA copy of their own
    jax.tree.map(np.testing.assert_array_equal, state['params'][name], jax.device_get(first['ema_params'][name]))
    assert jax.tree.leaves(state['ema_params'][name]) == []
  # Every latent weight trained: two Adam steps of 1e-2 move each by about 2e-2, the EMA (0.99) far less.
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state['params']['latent'], state['ema_params']['latent'])
  assert min(jax.tree.leaves(moved)) > 1e-3
  resumed = trainer.train(tiny_config(*stage, 'total_steps=3', 'sample_every=0'), str(tmp_path / 'latent'))
  assert int(resumed['step']) == 3
  with pytest.raises(UserError, match=r'another shape than in this model \(codes'):
    trainer.train(tiny_config(*stage, 'model.code_dim=16'), str(tmp_path / 'other'))
  assert not (tmp_path / 'other').exists()


def test_second_stage_with_an_encoder_trains_the_latent_dpm_on_the_frozen_encoders_codes(tmp_path):
  encoder = 'codes.source=encoder'
  batch = {'image': jnp.zeros((2, 32, 64, 3)), 'index': jnp.zeros((2,), jnp.int32)}
  shapes = jax.eval_shape(get_system(tiny_config(encoder)).init, jax.random.key(0), batch)
  first = {'params': random_params(shapes, seed=1), 'ema_params': random_params(shapes, seed=2)}
  saver = checkpoint.Checkpointer(str(tmp_path / 'first' / 'checkpoints'), 1)
  saver.save(5, first, {})
  saver.close()

  config = tiny_config(encoder, 'latent.stage=second', f'init_from={tmp_path / "first"}',
                       f'frozen={patchdm.SECOND_STAGE_FROZEN[0]}')
  system = get_system(config)
  shapes = jax.eval_shape(system.init, jax.random.key(0), batch)
  loaded = weights.initial_weights(config.init_from, config, shapes)
  assert set(loaded) == set(weights.flatten(first['params']))  # everything the first run has
  params = jax.tree_util.tree_map_with_path(lambda p, x: loaded.get(sharding.path_name(p), x),
                                            random_params(shapes, seed=3))
  for name in ('unet', 'encoder'):  # the first run's EMA weights
    jax.tree.map(np.testing.assert_array_equal, params[name], first['ema_params'][name])
  trainable = weights.trainable_mask(params, config.frozen)
  assert all(jax.tree.leaves(trainable['latent'])) and not any(jax.tree.leaves(trainable['encoder']))
  # The codes come from the batch's images through the encoder: other images, another loss.
  loss = jax.jit(lambda p, images, key: system.loss_fn(p, dict(batch, image=images), key)[0])
  rng = np.random.default_rng(4)
  images = [jnp.asarray(rng.uniform(-1, 1, (2, 32, 64, 3)), jnp.float32) for _ in range(2)]
  key = jax.random.key(5)
  assert float(loss(params, images[0], key)) != float(loss(params, images[1], key))


@pytest.mark.parametrize('mask_value, what', [(255, 'covers everything'), (0, 'nothing to inpaint')])
def test_inpainting_mask_must_mark_some_but_not_all_pixels(tmp_path, mask_value, what):
  photo, holes = tmp_path / 'photo.png', tmp_path / 'holes.png'
  Image.fromarray(np.full((32, 64, 3), 90, np.uint8)).save(photo)
  Image.fromarray(np.full((32, 64), mask_value, np.uint8)).save(holes)
  system = get_system(tiny_config(f'edit.input={photo}', f'edit.mask={holes}'))
  with pytest.raises(UserError, match=what):
    system.commands['inpaint'](None, jax.random.key(0), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
