"""Patch-DM: a patch UNet with feature collage, trained on 2×2 patch windows,
sampled at any size; --mode=outpaint / inpaint / sdedit edit an input image
(diffusion.editing.commands on a sample.size canvas).

The global semantic code, both ways of the paper (model.code_source):
  'table'   — params {'unet', 'codes': [num_codes, code_dim], 'latent'}: one
              code per training image (`batch['index']` picks it), optimised
              jointly. model.code_init='random' starts it N(0, 1);
              'clip' starts row i at the CLIP image embedding of training
              image i (model.clip_checkpoint, model.clip_preset), as the public
              code's initialize.py: CLIP's evaluation transform (shorter side
              to the tower's size, bicubic; centre crop), `encode_image`'s
              projected embedding, not L2-normalised. Computed on the host
              before the first step of a fresh run (`System.load_pretrained`),
              never on resume; model.code_dim must equal CLIP's embed_dim (512
              for ViT-B/16). Rows past the data size stay N(0, 1).
  'encoder' — params {'unet', 'encoder', 'latent'}: a semantic encoder (Diff-AE's
              half UNet, `SemanticEncoder`, model.encoder.*) trained with the
              UNet maps the whole training image, resized to
              model.encoder.size, to its code; the public code's 256² models.
              New codes for sampling come from the latent DPM, trained here on
              stop_gradient of the batch's encoder codes (the public code
              trains it afterwards on the encoder's codes of the training set,
              without z-normalisation): latent.enabled=true and
              latent.znormalize=false are required, sample.code_index has no
              table to pick from.

Training (the public code's recipe): the image is padded by half a patch with
zeros; x_t is zero on the padding; a random 2×2 window of patches goes through
the encoder; the loss is the ε-MSE of the collaged centre patch plus the
ε-MSE of the four plain patches masked to the unpadded area (averaged over
the whole window, as the public code does). Classifier-free dropout per image:
the code with probability diffusion.code_drop, the position embedding with
diffusion.pos_drop.

Latent DPM (latent.*): ε-prediction with an L1 loss on a constant-β schedule
(const0.008) over the codes (latent.batch_size random table rows each step, or
the batch's encoder codes), raw as the public code's train_latent.py
(latent.znormalize=true: z-normalised by the table's per-dimension mean and
std, Diff-AE's default). Two ways to train it (latent.stage):
  'joint'  — in the same steps as the UNet on stop_gradient(codes), its loss
             added with weight latent.loss_weight: one run and one checkpoint
             carry both, the UNet's gradients are untouched.
  'second' — the paper's second stage: a run of its own (a new workdir) that
             starts from the finished first run (trained with
             latent.enabled=false or joint) by config.init_from=<its workdir>
             (its EMA weights) with config.frozen=('^(?!latent/)',), and trains
             only the latent DPM, on the first run's table or encoder (eval
             mode, on the batch's images); UNet, codes and encoder are frozen
             copies, so the second workdir samples alone.
             Public code: batch 512, AdamW (weight decay 0.01), 60M samples.
`sample` draws codes with DDIM (latent.sample_steps) unless sample.code_index
picks table rows.

sample.stream_rows=R > 0 denoises each step in bands of R patch rows
(`streaming_denoiser`): the same images, with memory that grows with the width.
sample.shard_rows=True splits the patch rows over the model axis of config.mesh
and the images over its batch axes, data × fsdp, as in training
(`sharded_denoiser`, neighbours exchange one row of features per level); with
stream_rows, each device goes through its rows in bands.
"""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from visgen_jax import image_io
from visgen_jax.data import folder, pipeline
from visgen_jax.diffusion import editing, gaussian, losses, samplers, schedules
from visgen_jax.convert.clip import load_clip_checkpoint
from visgen_jax.errors import UserError
from visgen_jax.models import clip as clip_lib
from visgen_jax.models.latent_mlp import LatentMLP
from visgen_jax.models.patch_ablations import check_patch_mode, independent_denoiser, pixel_shift_denoiser
from visgen_jax.models.patch_sharding import rows_per_device, sharded_denoiser
from visgen_jax.models.patch_unet import (
    PatchUNet, check_band_rows, collage_denoiser, grid_positions, streaming_denoiser, to_patches)
from visgen_jax.models.semantic_encoder import SemanticEncoder
from visgen_jax.systems import System
from visgen_jax.train import sharding
from visgen_jax.train.config import base_config


CODE_SOURCES = ('table', 'encoder')
LATENT_STAGES = ('joint', 'second')
CODE_INITS = ('random', 'clip')
# config.model keys of the code table / encoder, not PatchUNet fields.
CODE_KEYS = ('num_codes', 'code_source', 'code_init', 'clip_checkpoint', 'clip_preset', 'encoder')
CLIP_BATCH = 32  # images per CLIP forward when initialising the table
# The second stage trains the latent DPM alone: everything else of the first run is frozen.
SECOND_STAGE_FROZEN = ('^(?!latent/)',)


def make_unet(model_config, compute_dtype='float32') -> PatchUNet:
  kwargs = {k: v for k, v in dict(model_config).items() if k not in CODE_KEYS}
  return PatchUNet(**kwargs, dtype=jnp.dtype(compute_dtype))


def make_encoder(model_config, compute_dtype='float32') -> SemanticEncoder:
  kwargs = {k: v for k, v in dict(model_config.encoder).items() if k != 'size'}
  return SemanticEncoder(code_dim=model_config.code_dim, attn_impl=model_config.attn_impl,
                         dtype=jnp.dtype(compute_dtype), **kwargs)


def clip_preprocess(images, size: int) -> np.ndarray:
  """CLIP's evaluation transform of [B, H, W, 3] images in [-1, 1]: the shorter
  side resized to `size` (PIL bicubic, the longer side truncated as
  torchvision's Resize), then the centre size×size crop; [-1, 1] float32 (the
  tower normalises with CLIP's mean and std itself)."""
  out = []
  for image in np.asarray(images, np.float32):
    im = Image.fromarray(image_io.to_uint8(image))
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((size, int(h * scale)) if w <= h else (int(w * scale), size), Image.BICUBIC)
    w, h = im.size
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    out.append(image_io.to_float(im.crop((left, top, left + size, top + size))))
  return np.stack(out)


def check_clip_settings(model_config):
  """model.clip_checkpoint exists; model.clip_preset's embed_dim (when given;
  else checked once the checkpoint is read) is model.code_dim."""
  path, preset = model_config.clip_checkpoint, model_config.clip_preset
  if not path or not os.path.isfile(path):
    raise UserError(f"config.model.code_init='clip' needs config.model.clip_checkpoint, the path of a CLIP "
                    f"checkpoint file (OpenAI .pt, open_clip .bin / .safetensors); got {path!r}.")
  if preset:
    check_clip_dim(clip_lib.clip_config(preset), model_config.code_dim)


def check_clip_dim(clip_config, code_dim: int):
  if clip_config['embed_dim'] != code_dim:
    raise UserError(f"config.model.code_dim={code_dim} differs from the CLIP embedding size "
                    f"{clip_config['embed_dim']} the code table is initialised with; set model.code_dim="
                    f"{clip_config['embed_dim']} or model.code_init='random'.")


def clip_code_table(config, rows: int) -> np.ndarray:
  """[rows, code_dim] float32: row i the CLIP image embedding of training
  image i (data.* read once in index order, centre-cropped like training
  images), rows without an image N(0, 1) from config.seed. Every process
  computes the whole table."""
  m = config.model
  clip_config, params = load_clip_checkpoint(m.clip_checkpoint, m.clip_preset or None)
  check_clip_dim(clip_config, m.code_dim)
  tower = clip_lib.vision_tower(clip_config)
  embed = jax.jit(lambda p, x: tower.apply({'params': p}, x))
  table = np.random.default_rng(config.seed).standard_normal((rows, m.code_dim)).astype(np.float32)
  if jax.process_index() == 0:
    print(f'Initialising the code table with the CLIP embeddings of the training images '
          f'({m.clip_checkpoint})', flush=True)
  with pipeline.make_eval_iterator(config.data, local_batch_size=CLIP_BATCH) as batches:
    for batch in batches:
      n = len(batch['index'])
      x = clip_preprocess(batch['image'], tower.image_size)
      x = np.concatenate([x, np.zeros((CLIP_BATCH - n, *x.shape[1:]), x.dtype)])  # one compiled shape
      table[batch['index']] = np.asarray(embed(params['visual'], x))[:n]
  return table


def make_latent(config) -> LatentMLP:
  c = config.latent
  return LatentMLP(code_dim=config.model.code_dim, num_layers=c.num_layers, hidden=c.hidden,
                   time_channels=c.time_channels, dropout=c.dropout)


def code_stats(codes, znormalize: bool):
  """Per-dimension (mean, std) that z-normalise the code table for the latent
  DPM (constant, not trained through), or (0, 1)."""
  if not znormalize:
    return 0.0, 1.0
  codes = jax.lax.stop_gradient(codes)
  return codes.mean(axis=0), codes.std(axis=0, ddof=1)


def latent_loss(latent: LatentMLP, schedule, latent_params, codes, key, *, batch_size: int | None,
                loss_type: str = 'l1', znormalize: bool = True):
  """Per-row loss [batch_size] of the latent DPM on random rows of the code
  table, or [len(codes)] on every row (batch_size None, e.g. a batch's encoder
  codes); no gradient reaches the codes."""
  rows_key, loss_key, dropout_key = jax.random.split(key, 3)
  mean, std = code_stats(codes, znormalize)
  if batch_size is not None:
    codes = codes[jax.random.randint(rows_key, (batch_size,), 0, codes.shape[0])]
  picked = jax.lax.stop_gradient(codes)
  model = lambda z_t, t: latent.apply({'params': latent_params}, z_t, t, train=True, rngs={'dropout': dropout_key})
  return losses.diffusion_loss(schedule, model, (picked - mean) / std, loss_key, loss_type=loss_type)[0]


def sample_codes(latent: LatentMLP, schedule, latent_params, codes, key, n: int, *, znormalize: bool = True):
  """n new codes [n, code_dim] by DDIM (η = 0, no clipping) on `schedule`
  (respaced), mapped back to the table's scale."""
  noise_key, key = jax.random.split(key)
  mean, std = code_stats(codes, znormalize)
  denoise = lambda z, t: latent.apply({'params': latent_params}, z, t)
  z = samplers.ddim(key, denoise, schedule, jax.random.normal(noise_key, (n, latent.code_dim)),
                    clip_denoised=False)
  return z * std + mean


def patch_grid(hw, patch: int, key: str):
  """(N1, N2) patches of an (H, W) image; UserError unless both divide."""
  h, w = hw
  if h % patch or w % patch or min(h, w) <= 0:
    raise UserError(f'config.{key}={h}x{w} is not divisible by the patch size {patch}; use multiples '
                    f'of {patch}.')
  return h // patch, w // patch


def num_codes(config) -> int:
  """Rows of the code table: model.num_codes, or (0) the training set's size."""
  info = pipeline.make_dataset_source(config.data)[1]
  rows = config.model.num_codes or info.num_examples
  if rows < info.num_examples:
    raise UserError(f'config.model.num_codes={rows} is smaller than the {info.num_examples} training '
                    f'images in {info.path}, whose indices pick codes; use 0 (= the data size) or more.')
  return rows


def code_setup(config):
  """(rows of the code table, 0 with the encoder; the encoder's input (H, W),
  None with the table), after checking the model.code_* / encoder.* keys."""
  m = config.model
  if m.code_source not in CODE_SOURCES:
    raise UserError(f'config.model.code_source={m.code_source!r} is unknown; allowed: {", ".join(CODE_SOURCES)}.')
  if m.code_init not in CODE_INITS:
    raise UserError(f'config.model.code_init={m.code_init!r} is unknown; allowed: {", ".join(CODE_INITS)}.')
  if m.code_source == 'table':
    if m.code_init == 'clip':
      check_clip_settings(m)
    return num_codes(config), None
  if m.code_init != 'random':
    raise UserError(f"config.model.code_init={m.code_init!r} initialises the code table, which "
                    "model.code_source='encoder' does not have; set code_init=random or code_source=table.")
  if not config.latent.enabled:
    raise UserError("config.model.code_source='encoder' samples with codes from the latent DPM; set "
                    "latent.enabled=true.")
  if config.latent.znormalize:
    raise UserError("config.latent.znormalize uses the code table's statistics, which "
                    "model.code_source='encoder' does not have; set latent.znormalize=false.")
  if tuple(config.sample.code_index):
    raise UserError("config.sample.code_index picks rows of the code table, which "
                    "model.code_source='encoder' does not have; leave it empty.")
  size = tuple(m.encoder.size)
  make_encoder(m).layout(size)
  return 0, size


def window_losses(shifted, plain, noise, inside):
  """Per-example ε-MSE of one 2×2 window: (collaged centre patch, plain patches
  masked to the unpadded area).

  shifted [B, 1, 1, p, p, C] and plain [B, 2, 2, p, p, C] are the model's
  outputs; noise [B, 2p, 2p, C] and inside [B, 2p, 2p, 1] (1 = image, 0 =
  padding) are the window's. The masked mean is over the whole window.
  """
  patch = shifted.shape[3]
  half = patch // 2
  target = noise[:, half:half + patch, half:half + patch]
  mse_collage = jnp.mean(jnp.square(shifted[:, 0, 0].astype(jnp.float32) - target), axis=(1, 2, 3))
  err = jnp.square(plain.astype(jnp.float32) - to_patches(noise, patch)) * to_patches(inside, patch)
  return mse_collage, jnp.mean(err, axis=(1, 2, 3, 4, 5))


def make(config) -> System:
  m = config.model
  patch = m.patch_size
  train_hw = folder.parse_resolution(config.data.resolution, 'data.resolution')
  train_grid = patch_grid(train_hw, patch, 'data.resolution')
  sample_hw = tuple(config.sample.size)
  if len(sample_hw) != 2:
    raise UserError(f'config.sample.size={sample_hw} must be H,W.')
  sample_grid = patch_grid(sample_hw, patch, 'sample.size')
  if config.diffusion.learn_sigma or m.out_channels != m.in_channels:
    raise UserError('Patch-DM predicts ε with a fixed variance: set diffusion.learn_sigma=false and '
                    'model.out_channels=model.in_channels.')
  for key in ('code_drop', 'pos_drop'):
    if not 0 <= config.diffusion[key] < 1:
      raise UserError(f'config.diffusion.{key}={config.diffusion[key]} must be a probability in [0, 1).')
  guidance = config.sampler.guidance_scale
  if guidance and not (config.diffusion.code_drop and config.diffusion.pos_drop):
    raise UserError('config.sampler.guidance_scale needs a model trained with code and position '
                    'dropout (diffusion.code_drop, diffusion.pos_drop > 0); set it to 0.')
  rows, encoder_hw = code_setup(config)
  picked = tuple(config.sample.code_index)
  bad = [i for i in picked if not 0 <= i < rows]
  if bad:
    raise UserError(f'config.sample.code_index={picked}: {bad} out of range; the code table has {rows} '
                    f'rows (0 … {rows - 1}).')
  if picked and len(picked) != config.sample.num:
    raise UserError(f'config.sample.code_index lists {len(picked)} codes for sample.num='
                    f'{config.sample.num} images; give one per image, or none to draw codes (by the '
                    'latent DPM, or random rows without it).')
  pos, pos_mask = grid_positions(sample_grid, train_grid, config.sample.positions,
                                 unconditional_positions=config.diffusion.pos_drop > 0)
  stream = config.sample.stream_rows
  if stream < 0:
    raise UserError(f'config.sample.stream_rows={stream} must be 0 (all patch rows at once) or a band '
                    'height in patch rows.')
  shard_rows = config.sample.shard_rows
  patch_mode = check_patch_mode(config.sample.patch_mode)
  if stream and patch_mode != 'collage':
    raise UserError(f'config.sample.stream_rows streams the feature collage; sample.patch_mode='
                    f'{patch_mode!r} is an unstreamed ablation: set one of them to its default.')
  if shard_rows and patch_mode != 'collage':
    raise UserError(f'config.sample.shard_rows splits the feature collage over devices; sample.patch_mode='
                    f'{patch_mode!r} is an ablation on one device: set one of them to its default.')
  if shard_rows:
    mesh = sharding.make_mesh(config.mesh)
    rows_per_device(sample_grid[0], mesh.shape['model'], stream)
    if mesh.shape['model'] == 1:
      raise UserError("config.sample.shard_rows splits the patch rows over config.mesh's model axis (the "
                      'images over data × fsdp), which has 1 device here; set e.g. --config.mesh.data=1 '
                      '--config.mesh.model=-1.')
    image_groups = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    if config.sample.num % image_groups:
      raise UserError(f"config.sample.num={config.sample.num} images do not split over config.mesh's data × "
                      f'fsdp = {image_groups} devices with sample.shard_rows; give a multiple of it.')
  elif stream:
    check_band_rows(sample_grid[0], stream)
  lat = config.latent
  if lat.enabled:
    if lat.loss_type not in losses.LOSS_TYPES:
      raise UserError(f'config.latent.loss_type={lat.loss_type!r} is unknown; allowed: '
                      f'{", ".join(losses.LOSS_TYPES)}.')
    if not 0 < lat.sample_steps <= lat.num_timesteps:
      raise UserError(f'config.latent.sample_steps={lat.sample_steps} must be in [1, {lat.num_timesteps}].')
    if lat.batch_size < 1:
      raise UserError(f'config.latent.batch_size={lat.batch_size} must be at least 1.')
    if lat.znormalize and rows < 2:
      raise UserError(f'config.latent.znormalize needs at least 2 codes to estimate their spread; the '
                      f'table has {rows}. Set latent.znormalize=false or add training images.')
    if lat.stage not in LATENT_STAGES:
      raise UserError(f'config.latent.stage={lat.stage!r} is unknown; allowed: {", ".join(LATENT_STAGES)}.')
    if lat.stage == 'second' and not (config.init_from and tuple(config.frozen) == SECOND_STAGE_FROZEN):
      raise UserError("config.latent.stage='second' trains only the latent DPM on a finished Patch-DM run: "
                      'set --config.init_from=<its workdir> --config.frozen=' + SECOND_STAGE_FROZEN[0] +
                      f' (got init_from={tuple(config.init_from)}, frozen={tuple(config.frozen)}).')
    latent = make_latent(config)
    latent_base = schedules.make_schedule(lat.noise_schedule, lat.num_timesteps)
    latent_sample_schedule = schedules.respace(latent_base, f'ddim{lat.sample_steps}')

  unet = make_unet(m, config.compute_dtype)
  if encoder_hw:
    encoder = make_encoder(m, config.compute_dtype)
  base = schedules.make_schedule(config.diffusion.noise_schedule, config.diffusion.num_timesteps)
  sample_schedule, sample_options = samplers.from_config(config, base)
  half = patch // 2

  def init(key, batch):
    unet_key, code_key, latent_key = jax.random.split(key, 3)
    b = batch['image'].shape[0]
    window = jnp.zeros((b, 2, 2, patch, patch, m.in_channels))
    params = unet.init(unet_key, window, jnp.zeros((b,), jnp.int32), jnp.zeros((b, 2, 2, 2)),
                       jnp.zeros((b, m.code_dim)), decode='both')['params']
    if encoder_hw:
      params = {'unet': params,
                'encoder': encoder.init(code_key, jnp.zeros((1, *encoder_hw, m.in_channels)))['params']}
    else:
      params = {'unet': params, 'codes': jax.random.normal(code_key, (rows, m.code_dim))}
    if lat.enabled:
      params['latent'] = latent.init(latent_key, jnp.zeros((1, m.code_dim)), jnp.zeros((1,), jnp.int32))['params']
    return params

  def encode(params, x0, key, train=True):
    """The semantic encoder's codes [B, code_dim] of whole training images."""
    b, h, w, c = x0.shape
    whole = x0 if (h, w) == encoder_hw else jax.image.resize(x0, (b, *encoder_hw, c), 'linear')
    return encoder.apply({'params': params['encoder']}, whole, train=train, rngs={'dropout': key})

  def latent_term(params, codes, key):
    """The latent DPM's mean loss on the table (random rows) or on a batch's encoder codes."""
    return latent_loss(latent, latent_base, params['latent'], codes, key,
                       batch_size=None if encoder_hw else lat.batch_size, loss_type=lat.loss_type,
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
    crop = jax.vmap(lambda img, i, j: jax.lax.dynamic_slice(
        img, (i * patch, j * patch, 0), (2 * patch, 2 * patch, img.shape[-1])))
    x_win, noise_win, inside_win = (crop(a, wi, wj) for a in (x_t, noise, inside))
    offsets = jnp.arange(2, dtype=jnp.float32)
    pos = jnp.stack(jnp.broadcast_arrays(wi[:, None, None] + offsets[None, :, None],
                                         wj[:, None, None] + offsets[None, None, :]), axis=-1)

    if encoder_hw:
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
      metrics[f'latent_{lat.loss_type}'] = latent_term(params, codes if encoder_hw else params['codes'], latent_key)
      loss = loss + lat.loss_weight * metrics[f'latent_{lat.loss_type}']
    return loss, metrics

  def second_stage_loss_fn(params, batch, key):
    """The latent DPM alone, on the frozen first stage's codes."""
    encoder_key, latent_key = jax.random.split(key)
    codes = encode(params, batch['image'], encoder_key, train=False) if encoder_hw else params['codes']
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
    if shard_rows:
      denoise = sharded_denoiser(unet, params['unet'], pos, pos_mask, mesh, 'model', stream, sharding.BATCH_AXES)
    elif stream:
      denoise = streaming_denoiser(unet, params['unet'], pos, pos_mask, stream)
    elif patch_mode == 'independent':
      denoise = independent_denoiser(unet, params['unet'], pos, pos_mask)
    elif patch_mode == 'pixel_shift':
      denoise = pixel_shift_denoiser(unet, params['unet'], pos, pos_mask, sample_schedule.timesteps)
    else:
      denoise = collage_denoiser(unet, params['unet'], pos, pos_mask)
    return samplers.sample(config.sampler.name, sample_key, denoise, sample_schedule, x_T, cond=cond, **options)

  @jax.jit
  def sample(params, key):
    noise_key, key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, (config.sample.num, *sample_hw, m.in_channels))
    return run_sampler(params, key, x_T)

  second_stage = lat.enabled and lat.stage == 'second'
  return System(init=init, loss_fn=second_stage_loss_fn if second_stage else loss_fn, sample=sample,
                commands=editing.commands(config, run_sampler, sample_schedule.num_steps, sample_hw, 'sample.size'),
                load_pretrained=load_pretrained if m.code_init == 'clip' and not second_stage else None)


def encoder_size(resolution, shorter: int = 256):
  """The semantic encoder's input: `resolution` scaled down to a shorter side
  of at most `shorter` (the public code's 256² encoder input)."""
  h, w = resolution
  if min(h, w) <= shorter:
    return (h, w)
  return (h * shorter // min(h, w), w * shorter // min(h, w))


def default_config(resolution, sample_num: int = 4):
  """The paper's settings for Patch-DM on images of `resolution` (H, W); the
  three configs/patchdm_*.py differ only in data and size."""
  c = base_config()
  c.system = 'patchdm'
  # Public code: Adam(W) 1e-4, batch 32 x 4 GPUs, EMA 0.9999, no warmup.
  c.total_steps = 500_000
  c.batch_size = 128
  c.log_every = 100
  c.ckpt_every = 5_000
  c.sample_every = 10_000
  c.optimizer.learning_rate = 1e-4
  c.optimizer.grad_clip = 1.0
  # (H, W): an int resolution in base_config would refuse a tuple.
  c.data = ml_collections.ConfigDict(dict(c.data, resolution=tuple(resolution)))
  c.data.name = 'sample'  # the built-in photographs, resized; or folder + data.path
  c.data.random_flip = True
  c.model = ml_collections.ConfigDict(dict(
      patch_size=64, in_channels=3, model_channels=64, out_channels=3, num_res_blocks=2,
      attention_resolutions=(16,), dropout=0.1, channel_mult=(1, 2, 4, 8), num_heads=1,
      num_head_channels=-1, resblock_updown=True, embed_dim=512, pos_channels=64, code_dim=512,
      num_codes=0,  # rows of the code table; 0 = the number of training images
      remat=False, attn_impl='xla', collage_impl='xla',
      code_source='table',  # or 'encoder': a semantic encoder of the whole image, trained jointly
      code_init='random',  # table start; 'clip': CLIP image embeddings of the training images
      clip_checkpoint='',  # for code_init=clip: OpenAI's ViT-B-16.pt (or open_clip .bin/.safetensors)
      clip_preset='ViT-B-16-quickgelu',  # its architecture and activation; '' = read off an OpenAI .pt
      # Diff-AE's half UNet as the public code builds it; the image is resized to `size` first.
      encoder=ml_collections.ConfigDict(dict(
          size=encoder_size(resolution), model_channels=64, channel_mult=(1, 2, 4, 8, 8), num_res_blocks=2,
          attention_resolutions=(16,), dropout=0.1, num_heads=1, num_head_channels=-1,
          resblock_updown=True))))
  c.diffusion = ml_collections.ConfigDict(dict(
      noise_schedule='linear', num_timesteps=1000, learn_sigma=False,
      code_drop=0.1, pos_drop=0.5))  # classifier-free dropout of the code / the position
  c.sampler = ml_collections.ConfigDict(dict(name='ddim', steps=50, eta=0.0, guidance_scale=0.0))
  c.sample.num = sample_num
  c.sample.size = tuple(resolution)
  c.sample.positions = 'interpolate'  # or 'extend': beyond the trained grid, no position there
  c.sample.code_index = ()  # rows of the code table, one per image; () = drawn by the latent DPM
  c.sample.stream_rows = 0  # > 0: denoise in bands of this many patch rows (memory ~ width)
  c.sample.shard_rows = False  # True: the patch rows over config.mesh's model axis, the images over data × fsdp
  # The paper's seam ablation: 'independent' patches or 'pixel_shift'ed patch grids instead of collage.
  c.sample.patch_mode = 'collage'
  # The latent DPM over the codes (public code: Diff-AE's MLPSkipNet, L1, const0.008, eps).
  c.latent = ml_collections.ConfigDict(dict(
      enabled=True, num_layers=10, hidden=2048, time_channels=64, dropout=0.0,
      noise_schedule='const0.008', num_timesteps=1000, loss_type='l1',
      batch_size=512, loss_weight=1.0, sample_steps=50,
      znormalize=False,  # True: codes → (codes - mean) / std per dimension, over the table
      stage='joint'))  # or 'second': only the latent DPM, on a finished run (init_from, frozen)
  c.edit = editing.edit_config()
  return c


def tiny(c, resolution=(32, 64)):
  """A CPU-sized variant: 16² patches, one level of downsampling, small embeddings."""
  c.total_steps = 20
  c.batch_size = 4
  c.log_every = 5
  c.ckpt_every = 10
  c.sample_every = 20
  c.optimizer.ema_decay = 0.99
  c.data.resolution = tuple(resolution)
  c.model.update(patch_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), embed_dim=64, pos_channels=16, code_dim=32)
  size = encoder_size(resolution, min(resolution) // 2)
  c.model.encoder.update(size=size, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(size[0] // 2,))
  c.sampler.steps = 5
  c.latent.update(num_layers=3, hidden=64, batch_size=16, sample_steps=5)
  c.sample.num = 2
  c.sample.size = tuple(resolution)
  return c
