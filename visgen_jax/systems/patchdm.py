"""Patch-DM: a patch UNet with feature collage (models/patch_unet.py), trained
on random 2×2 windows of patches of the image padded by half a patch, sampled
at any size; --mode=outpaint / inpaint / sdedit edit an input image
(diffusion.editing on a sample.size canvas). The settings, and what they mean:
configs/patchdm_base.py.

Params: {'unet'; 'codes' [num_codes, code_dim] (codes.source='table') or
'encoder' (codes.source='encoder'); 'latent' (latent.enabled)}. The loss (the
public code's): the ε-MSE of the collaged centre patch plus that of the four
plain patches masked to the unpadded area, with classifier-free dropout of the
code and of the position per image, plus latent.loss_weight × the latent DPM's
loss on stop_gradient(codes); latent.stage='second' trains the latent DPM alone
on a finished run's frozen weights. codes.init='clip' computes the table on a
fresh start (`System.load_pretrained`). `sample` draws codes with the latent DPM
(or picks sample.code_index rows) and denoises all patch rows at once, in bands
(sample.stream_rows), split over devices (sample.shard_rows) or as the seam
ablation (sample.patch_mode).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.convert.clip import load_clip_checkpoint
from visgen_jax.data import folder, pipeline
from visgen_jax.diffusion import editing, gaussian, losses, samplers, schedules
from visgen_jax.errors import UserError, for_setting
from visgen_jax.models import clip as clip_lib
from visgen_jax.models import patch_sampling
from visgen_jax.models.latent_mlp import LatentMLP, latent_loss, sample_codes
from visgen_jax.models.patch_sharding import rows_per_device
from visgen_jax.models.patch_unet import (
    PatchUNet, check_band_rows, crop_windows, grid_positions, patch_grid, to_patches, window_losses)
from visgen_jax.models.semantic_encoder import SemanticEncoder
from visgen_jax.systems import System
from visgen_jax.train import config as config_lib
from visgen_jax.train import sharding

CODE_SOURCES = ('table', 'encoder')
CODE_INITS = ('random', 'clip')
LATENT_STAGES = ('joint', 'second')
CLIP_BATCH = 32  # images per CLIP forward when initialising the table
# The second stage trains the latent DPM alone: everything else of the first run is frozen.
SECOND_STAGE_FROZEN = ('^(?!latent/)',)


def make_unet(config) -> PatchUNet:
  return PatchUNet(**config.model, dtype=jnp.dtype(config.compute_dtype))


def make_encoder(config) -> SemanticEncoder:
  """The semantic encoder of config.codes.encoder, giving the UNet's codes."""
  return SemanticEncoder(**config.codes.encoder, code_dim=config.model.code_dim, attn_impl=config.model.attn_impl,
                         dtype=jnp.dtype(config.compute_dtype))


def make_latent(config) -> LatentMLP:
  c = config.latent
  return LatentMLP(code_dim=config.model.code_dim, num_layers=c.num_layers, hidden=c.hidden,
                   time_channels=c.time_channels, dropout=c.dropout)


def num_codes(config) -> int:
  """Rows of the code table: codes.num, or (0) the training set's size."""
  info = pipeline.make_dataset_source(config.data)[1]
  rows = config.codes.num or info.num_examples
  if rows < info.num_examples:
    raise UserError(f'config.codes.num={rows} is smaller than the {info.num_examples} training '
                    f'images in {info.path}, whose indices pick codes; use 0 (= the data size) or more.')
  return rows


def check_clip_dim(embed_dim: int, code_dim: int):
  if embed_dim != code_dim:
    raise UserError(f'config.model.code_dim={code_dim} differs from the CLIP embedding size {embed_dim} the '
                    f"code table is initialised with; set model.code_dim={embed_dim} or codes.init='random'.")


def validate(config):
  m, s, lat = config.model, config.sample, config.latent
  with for_setting('config.model'):
    make_unet(config).layout()
  train_hw = folder.parse_resolution(config.data.resolution, 'data.resolution')
  with for_setting('config.data.resolution'):
    train_grid = patch_grid(train_hw, m.patch_size)
  with for_setting('config.sample.size'):
    sample_grid = patch_grid(tuple(s.size), m.patch_size)
  if config.diffusion.learn_sigma or m.out_channels != m.in_channels:
    raise UserError('Patch-DM predicts ε with a fixed variance: set diffusion.learn_sigma=false and '
                    'model.out_channels=model.in_channels.')
  for key in ('code_drop', 'pos_drop'):
    if not 0 <= config.diffusion[key] < 1:
      raise UserError(f'config.diffusion.{key}={config.diffusion[key]} must be a probability in [0, 1).')
  if config.sampler.guidance_scale and not (config.diffusion.code_drop and config.diffusion.pos_drop):
    raise UserError('config.sampler.guidance_scale needs a model trained with code and position '
                    'dropout (diffusion.code_drop, diffusion.pos_drop > 0); set it to 0.')
  samplers.from_config(config, schedules.make_schedule(config.diffusion.noise_schedule,
                                                       config.diffusion.num_timesteps))
  rows = _validate_codes(config)
  picked = tuple(s.code_index)
  bad = [i for i in picked if not 0 <= i < rows]
  if bad:
    raise UserError(f'config.sample.code_index={picked}: {bad} out of range; the code table has {rows} '
                    f'rows (0 … {rows - 1}).')
  if picked and len(picked) != s.num:
    raise UserError(f'config.sample.code_index lists {len(picked)} codes for sample.num={s.num} images; '
                    'give one per image, or none to draw codes (by the latent DPM, or random rows without it).')
  with for_setting('config.sample.positions'):
    grid_positions(sample_grid, train_grid, s.positions, unconditional_positions=config.diffusion.pos_drop > 0)
  with for_setting('config.sample'):
    patch_sampling.check_options(s.patch_mode, s.stream_rows, s.shard_rows)
  if s.stream_rows and not s.shard_rows:  # with shard_rows, per device: checked with the mesh
    with for_setting('config.sample.stream_rows'):
      check_band_rows(sample_grid[0], s.stream_rows)
  if lat.enabled:
    _validate_latent(config, rows)


def _validate_codes(config) -> int:
  """Rows of the code table (0 with the encoder), after checking config.codes."""
  codes = config.codes
  config_lib.check_choice(config, 'codes.source', CODE_SOURCES)
  config_lib.check_choice(config, 'codes.init', CODE_INITS)
  if codes.source == 'table':
    if codes.init == 'clip':
      if not codes.clip_checkpoint or not os.path.isfile(codes.clip_checkpoint):
        raise UserError(f"config.codes.init='clip' needs config.codes.clip_checkpoint, the path of a CLIP "
                        f'checkpoint file (OpenAI .pt, open_clip .bin / .safetensors); got {codes.clip_checkpoint!r}.')
      if codes.clip_preset:  # else checked once the checkpoint is read
        with for_setting('config.codes.clip_preset'):
          embed_dim = clip_lib.clip_config(codes.clip_preset)['embed_dim']
        check_clip_dim(embed_dim, config.model.code_dim)
    return num_codes(config)
  if codes.init != 'random':
    raise UserError(f"config.codes.init={codes.init!r} initialises the code table, which "
                    "codes.source='encoder' does not have; set codes.init=random or codes.source=table.")
  if not config.latent.enabled:
    raise UserError("config.codes.source='encoder' samples with codes from the latent DPM; set "
                    'latent.enabled=true.')
  if config.latent.znormalize:
    raise UserError("config.latent.znormalize uses the code table's statistics, which "
                    "codes.source='encoder' does not have; set latent.znormalize=false.")
  if tuple(config.sample.code_index):
    raise UserError("config.sample.code_index picks rows of the code table, which "
                    "codes.source='encoder' does not have; leave it empty.")
  with for_setting('config.codes.encoder'):
    make_encoder(config).layout()
  return 0


def _validate_latent(config, rows: int):
  lat = config.latent
  config_lib.check_choice(config, 'latent.loss_type', losses.LOSS_TYPES)
  config_lib.check_choice(config, 'latent.stage', LATENT_STAGES)
  if not 0 < lat.sample_steps <= lat.num_timesteps:
    raise UserError(f'config.latent.sample_steps={lat.sample_steps} must be in [1, {lat.num_timesteps}].')
  if lat.batch_size < 1:
    raise UserError(f'config.latent.batch_size={lat.batch_size} must be at least 1.')
  if lat.znormalize and rows < 2:
    raise UserError(f'config.latent.znormalize needs at least 2 codes to estimate their spread; the '
                    f'table has {rows}. Set latent.znormalize=false or add training images.')
  if lat.stage == 'second' and not (config.init_from and tuple(config.frozen) == SECOND_STAGE_FROZEN):
    raise UserError("config.latent.stage='second' trains only the latent DPM on a finished Patch-DM run: "
                    'set --config.init_from=<its workdir> --config.frozen=' + SECOND_STAGE_FROZEN[0] +
                    f' (got init_from={tuple(config.init_from)}, frozen={tuple(config.frozen)}).')
  schedules.make_schedule(lat.noise_schedule, lat.num_timesteps)


def clip_code_table(config, rows: int) -> np.ndarray:
  """[rows, code_dim] float32: row i the CLIP image embedding of training image
  i (data.* read once in index order), rows without an image N(0, 1) from
  config.seed. Every process computes the whole table."""
  codes, code_dim = config.codes, config.model.code_dim
  clip_config, params = load_clip_checkpoint(codes.clip_checkpoint, codes.clip_preset or None)
  check_clip_dim(clip_config['embed_dim'], code_dim)
  table = np.random.default_rng(config.seed).standard_normal((rows, code_dim)).astype(np.float32)
  if jax.process_index() == 0:
    print(f'Initialising the code table with the CLIP embeddings of the training images '
          f'({codes.clip_checkpoint})', flush=True)
  with pipeline.make_eval_iterator(config.data, local_batch_size=CLIP_BATCH) as batches:
    return clip_lib.embed_indexed_images(clip_lib.vision_tower(clip_config), params['visual'], batches, table,
                                         CLIP_BATCH)


def row_mesh(config, rows: int):
  """config.mesh for sample.shard_rows: `rows` patch rows over its model axis,
  sample.num images over data × fsdp (checked here: it needs the devices)."""
  mesh = sharding.make_mesh(config.mesh)
  with for_setting('config.sample.stream_rows'):
    rows_per_device(rows, mesh.shape['model'], config.sample.stream_rows)
  if mesh.shape['model'] == 1:
    raise UserError("config.sample.shard_rows splits the patch rows over config.mesh's model axis (the "
                    'images over data × fsdp), which has 1 device here; set e.g. --config.mesh.data=1 '
                    '--config.mesh.model=-1.')
  image_groups = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  if config.sample.num % image_groups:
    raise UserError(f"config.sample.num={config.sample.num} images do not split over config.mesh's data × "
                    f'fsdp = {image_groups} devices with sample.shard_rows; give a multiple of it.')
  return mesh


def make(config) -> System:
  m, lat, s = config.model, config.latent, config.sample
  patch = m.patch_size
  train_grid = patch_grid(folder.parse_resolution(config.data.resolution, 'data.resolution'), patch)
  sample_hw = tuple(s.size)
  sample_grid = patch_grid(sample_hw, patch)
  pos, pos_mask = grid_positions(sample_grid, train_grid, s.positions,
                                 unconditional_positions=config.diffusion.pos_drop > 0)
  mesh = row_mesh(config, sample_grid[0]) if s.shard_rows else None
  guidance = config.sampler.guidance_scale
  picked = tuple(s.code_index)
  unet = make_unet(config)
  encoder = make_encoder(config) if config.codes.source == 'encoder' else None
  rows = 0 if encoder else num_codes(config)
  base = schedules.make_schedule(config.diffusion.noise_schedule, config.diffusion.num_timesteps)
  sample_schedule, sample_options = samplers.from_config(config, base)
  if lat.enabled:
    latent = make_latent(config)
    latent_base = schedules.make_schedule(lat.noise_schedule, lat.num_timesteps)
    latent_sample_schedule = schedules.respace(latent_base, f'ddim{lat.sample_steps}')
  half = patch // 2

  def init(key, batch):
    unet_key, code_key, latent_key = jax.random.split(key, 3)
    b = batch['image'].shape[0]
    window = jnp.zeros((b, 2, 2, patch, patch, m.in_channels))
    params = unet.init(unet_key, window, jnp.zeros((b,), jnp.int32), jnp.zeros((b, 2, 2, 2)),
                       jnp.zeros((b, m.code_dim)), decode='both')['params']
    if encoder:
      params = {'unet': params,
                'encoder': encoder.init(code_key, jnp.zeros((1, *encoder.size, m.in_channels)))['params']}
    else:
      params = {'unet': params, 'codes': jax.random.normal(code_key, (rows, m.code_dim))}
    if lat.enabled:
      with for_setting('config.latent'):
        params['latent'] = latent.init(latent_key, jnp.zeros((1, m.code_dim)), jnp.zeros((1,), jnp.int32))['params']
    return params

  def encode(params, x0, key, train=True):
    """The semantic encoder's codes [B, code_dim] of whole training images."""
    return encoder.apply({'params': params['encoder']}, x0, train=train, rngs={'dropout': key})

  def latent_term(params, codes, key):
    """The latent DPM's mean loss on the table (random rows) or on a batch's encoder codes."""
    return latent_loss(latent, latent_base, params['latent'], codes, key,
                       batch_size=None if encoder else lat.batch_size, loss_type=lat.loss_type,
                       znormalize=lat.znormalize).mean()

  def loss_fn(params, batch, key):
    x0 = batch['image']
    b, h, w, c = x0.shape
    t_key, noise_key, i_key, j_key, drop_key, dropout_key, latent_key = jax.random.split(key, 7)
    pad = ((0, 0), (half, half), (half, half), (0, 0))
    padded = jnp.pad(x0, pad)
    inside = jnp.pad(jnp.ones((b, h, w, 1), x0.dtype), pad)
    step = jax.random.randint(t_key, (b,), 0, base.num_steps)
    noise = jax.random.normal(noise_key, padded.shape, x0.dtype)
    x_t = gaussian.q_sample(base, padded, step, noise) * inside

    # One random 2x2 window of the (N1+1)x(N2+1) padded grid per image.
    wi = jax.random.randint(i_key, (b,), 0, h // patch)
    wj = jax.random.randint(j_key, (b,), 0, w // patch)
    (x_win, noise_win, inside_win), pos = crop_windows((x_t, noise, inside), wi, wj, patch)

    if encoder:
      # A key of its own: the same dropout key would give the encoder the UNet's dropout masks.
      codes = encode(params, x0, jax.random.fold_in(dropout_key, 1))
    else:
      codes = params['codes'][batch['index']]
    code_u, pos_u = jax.random.uniform(drop_key, (2, b))
    code = codes * (code_u >= config.diffusion.code_drop)[:, None]
    keep_pos = jnp.broadcast_to((pos_u >= config.diffusion.pos_drop)[:, None, None], (b, 2, 2))
    t = schedules.to_device(base).timesteps[step]
    shifted, plain = unet.apply({'params': params['unet']}, to_patches(x_win, patch), t, pos, code,
                                keep_pos, decode='both', train=True, rngs={'dropout': dropout_key})

    mse_collage, mse_plain = window_losses(shifted, plain, noise_win, inside_win)
    loss = (mse_collage + mse_plain).mean()
    metrics = {'mse_collage': mse_collage.mean(), 'mse_plain': mse_plain.mean()}
    if lat.enabled:
      metrics[f'latent_{lat.loss_type}'] = latent_term(params, codes if encoder else params['codes'], latent_key)
      loss = loss + lat.loss_weight * metrics[f'latent_{lat.loss_type}']
    return loss, metrics

  def second_stage_loss_fn(params, batch, key):
    """The latent DPM alone, on the frozen first stage's codes."""
    encoder_key, latent_key = jax.random.split(key)
    codes = encode(params, batch['image'], encoder_key, train=False) if encoder else params['codes']
    value = latent_term(params, codes, latent_key)
    return value, {f'latent_{lat.loss_type}': value}

  def load_pretrained(params):
    return dict(params, codes=clip_code_table(config, rows))

  def codes_for(params, key, n):
    """The picked table rows; else codes drawn by the latent DPM; else random rows."""
    if picked:
      return params['codes'][jnp.asarray(picked)]
    if not lat.enabled:
      return params['codes'][jax.random.randint(key, (n,), 0, rows)]
    return sample_codes(latent, latent_sample_schedule, params['latent'], params.get('codes'), key, n,
                        znormalize=lat.znormalize)

  def run_sampler(params, key, x_T, **extra):
    code_key, sample_key = jax.random.split(key)
    n = x_T.shape[0]
    options = dict(sample_options, **extra)
    if guidance:
      options.update(cfg_weight=guidance, uncond={'code': 0.0, 'use_pos': 0.0})
    cond = {'code': codes_for(params, code_key, n), 'use_pos': jnp.ones((n,))}
    denoise = patch_sampling.patch_denoiser(
        unet, params['unet'], pos, pos_mask, patch_mode=s.patch_mode, stream_rows=s.stream_rows, mesh=mesh,
        batch_axes=sharding.BATCH_AXES, timesteps=sample_schedule.timesteps)
    return samplers.sample(config.sampler.name, sample_key, denoise, sample_schedule, x_T, cond=cond, **options)

  @jax.jit
  def sample(params, key):
    noise_key, key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, (s.num, *sample_hw, m.in_channels))
    return run_sampler(params, key, x_T)

  second_stage = lat.enabled and lat.stage == 'second'
  return System(init=init, loss_fn=second_stage_loss_fn if second_stage else loss_fn, sample=sample,
                commands=editing.commands(config, run_sampler, sample_schedule.num_steps, sample_hw, 'sample.size'),
                load_pretrained=load_pretrained if config.codes.init == 'clip' and not second_stage else None,
                reads_batch=not second_stage or bool(encoder))
