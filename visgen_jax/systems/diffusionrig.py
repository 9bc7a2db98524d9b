"""DiffusionRig: an ADM UNet denoising x_t concatenated with physical buffers (rendered,
normals, albedo), conditioned on a global code from a ResNet-18 of the clean image;
ε-MSE with P2 weighting, learn_sigma=False. --mode=edit relights, swaps codes, buffers or the
UNet (another workdir's), from a shared random noise or the input's DDIM inversion.

Params: {'unet', 'encoder', 'batch_stats': {'encoder'}}; the encoder's BatchNorm
statistics are model state (System.state_keys). Stage 2 freezes the encoder with
config.frozen = '^(encoder|batch_stats)/': then the encoder runs in eval mode (its
running statistics normalise, and stay bit-identical), so an image's code in
training is the code it gets at inference. (The public code keeps the encoder in
training mode and its statistics moving although it is "frozen".)

config.model.condition: 'buffers' (the model above, in_channels 12) or 'vector', the
paper's ablation (Table 3.1): no buffers (in_channels 3); the physical parameters the
buffers are rendered from, as the data's 'physical' vector (rig_subjects: light, head
pose and semi-axes; rig_folder: light and the FLAME parameters), are concatenated to
the global code, so the UNet's code layers take code_dim + that size (one Linear per
ResBlock as before, no separate projection: the public code has no ablation model, and
concatenation is what the paper describes). Edits change the vector as they change the
buffers: relighting replaces its light, a buffer swap takes another image's vector.
"""

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from visgen_jax import image_io
from visgen_jax.data import pipeline, rig_buffers, rig_subjects
from visgen_jax.diffusion import losses, samplers, schedules
from visgen_jax.errors import UserError, for_setting
from visgen_jax.models import sh_lighting
from visgen_jax.models.adm_unet import ADMUNet, adm_layout
from visgen_jax.models.resnet import ResNet18
from visgen_jax.systems import System
from visgen_jax.train import checkpoint, sharding, weights
from visgen_jax.train import config as config_lib

IN_CHANNELS = {'buffers': 3 + 3 * len(rig_subjects.BUFFERS), 'vector': 3}  # by config.model.condition
PHYSICAL = {'rig_subjects': rig_subjects.PHYSICAL, 'rig_folder': rig_buffers.PHYSICAL}  # the vector's parts
ENCODER_STATS = 'batch_stats/encoder/bn1/mean'  # a path config.frozen matches when it freezes the statistics


def edit_config() -> ml_collections.ConfigDict:
  """config.edit of --mode=edit. Each input is an image with its buffers beside it (face.png +
  face.npz: normal, albedo, alpha, optional rendered and light); edit sources are the same."""
  return ml_collections.ConfigDict(dict(
      input='',  # comma list of images to edit
      light='',  # relight with the SH light [9, 3] of this .npy
      light_from='',  # relight with the light of this image's buffers (estimated if its .npz has none)
      rotate_degrees=(),  # relight with the input's light turned about the vertical axis
      code_from='',  # the global code of this image
      buffers_from='',  # this image's buffers
      model_from='',  # the UNet of this workdir (another person's stage 2) with the input's buffers and code
      invert=False,  # start every edit from the input's DDIM-inverted noise, not from a random one
  ))


def validate(config):
  res = config.data.resolution
  if res != config.model.image_size:
    raise UserError(f'config.data.resolution={res} differs from config.model.image_size={config.model.image_size}; '
                    'set them equal.')
  condition = config.model.condition
  if condition not in IN_CHANNELS:
    raise UserError(f'config.model.condition={condition!r}; allowed: {", ".join(IN_CHANNELS)}.')
  if config.model.in_channels != IN_CHANNELS[condition]:
    raise UserError(f'config.model.in_channels={config.model.in_channels}; with config.model.condition='
                    f'{condition!r} the UNet denoises x_t{" with its buffers" * (condition == "buffers")}: '
                    f'{IN_CHANNELS[condition]}.')
  if condition == 'vector' and config.data.name not in PHYSICAL:
    raise UserError(f'config.data.name={config.data.name!r} has no physical parameters for '
                    f'config.model.condition=\'vector\'; allowed: {", ".join(PHYSICAL)}.')
  if condition == 'vector' and config.data.random_flip:
    raise UserError('config.data.random_flip=True with config.model.condition=\'vector\': the parameters of a '
                    'mirrored face are not known; set it False.')
  if config.diffusion.learn_sigma or config.model.out_channels != 3:
    raise UserError(f'config.diffusion.learn_sigma={config.diffusion.learn_sigma}, config.model.out_channels='
                    f'{config.model.out_channels}: DiffusionRig predicts ε only; set False and 3.')
  if not config.model.code_dim:
    raise UserError('config.model.code_dim=0; DiffusionRig needs the global code (64 in the paper).')
  with for_setting('config.model'):
    adm_layout(_unet(config))
  samplers.from_config(config, schedules.make_schedule(config.diffusion.noise_schedule,
                                                       config.diffusion.num_timesteps))


def _encoder_frozen(config) -> bool:
  return any(re.search(p, ENCODER_STATS) for p in config.frozen)


def conditioning(config, batch):
  """The condition of a batch: buffers concatenated [B, H, W, 9] or the physical vector [B, P]."""
  if config.model.condition == 'vector':
    return batch['physical']
  return jnp.concatenate([batch[k] for k in rig_subjects.BUFFERS], axis=-1)


def _physical_parts(config) -> dict:
  """{key: shape} of the physical vector's parts the model is conditioned on (none for buffers)."""
  return PHYSICAL[config.data.name] if config.model.condition == 'vector' else {}


def _example_condition(config, example):
  """conditioning() of one edit example: its physical vector made from its (maybe edited) parts."""
  parts = _physical_parts(config)
  return conditioning(config, dict(example, physical=rig_subjects.physical_vector(example, parts)) if parts
                      else example)


def _unet(config, dtype=jnp.float32) -> ADMUNet:
  fields = {k: v for k, v in config.model.items() if k != 'condition'}
  if config.model.condition == 'vector':
    fields['code_dim'] += rig_subjects.physical_size(PHYSICAL[config.data.name])
  return ADMUNet(**fields, dtype=dtype)


def _check_data_has_physical(config, info):
  if config.model.condition == 'vector' and config.data.name == 'rig_folder':
    flame = rig_buffers.num_with_flame(info.path)
    if flame < info.num_examples:
      raise UserError(f'config.data.path={info.path!r}: {info.num_examples - flame} of its {info.num_examples} '
                      "images have no FLAME parameters, which config.model.condition='vector' needs; use "
                      "condition='buffers' or buffers with shape, exp, pose, cam and tex.")


def networks(config):
  """(init, encode, denoise, generate, invert): init(key, batch) -> params; encode(params, image) -> code;
  denoise(params, x_t, t, condition, code, **apply_options) -> ε; generate(params, noise, condition,
  code) -> images by config.sampler (jitted; deterministic for DDIM with eta=0); invert(params, image,
  condition, code) -> the noise from which generate (DDIM, eta=0) gives back `image` (DDIM inversion to
  the level where it starts). `condition` is `conditioning(config, batch)`."""
  unet = _unet(config, jnp.dtype(config.compute_dtype))
  encoder = ResNet18(config.model.code_dim)
  sample_schedule, sample_options = samplers.from_config(config, schedules.make_schedule(
      config.diffusion.noise_schedule, config.diffusion.num_timesteps))

  def init(key, batch):
    unet_key, encoder_key = jax.random.split(key)
    image = batch['image']
    variables = encoder.init(encoder_key, image)
    x = image if config.model.condition == 'vector' else jnp.concatenate([image, conditioning(config, batch)], -1)
    code = jnp.zeros((image.shape[0], unet.code_dim))  # the encoder's code (and the physical vector)
    return {'unet': unet.init(unet_key, x, jnp.zeros(x.shape[:1], jnp.int32), code=code)['params'],
            'encoder': variables['params'], 'batch_stats': {'encoder': variables['batch_stats']}}

  def encode(params, image):
    return encoder.apply({'params': params['encoder'], 'batch_stats': params['batch_stats']['encoder']}, image)

  def denoise(params, x_t, t, condition, code, **options):
    if config.model.condition == 'vector':
      x, code = x_t, jnp.concatenate([code, condition.astype(code.dtype)], -1)
    else:
      x = jnp.concatenate([x_t, condition], -1)
    return unet.apply({'params': params['unet']}, x, t, code=code, **options).astype(jnp.float32)

  @jax.jit
  def generate(params, noise, condition, code):
    denoise_fn = lambda x_t, t: denoise(params, x_t, t, condition, code)
    return samplers.sample(config.sampler.name, jax.random.key(0), denoise_fn, sample_schedule, noise,
                           **sample_options)

  @jax.jit
  def invert(params, image, condition, code):
    denoise_fn = lambda x_t, t: denoise(params, x_t, t, condition, code)
    return samplers.ddim_invert(denoise_fn, sample_schedule, image, num_steps=sample_schedule.num_steps - 1)

  return init, encode, denoise, generate, invert


def make(config) -> System:
  _, info = pipeline.make_dataset_source(config.data)
  if info.num_examples < config.batch_size:
    raise UserError(f'config.batch_size={config.batch_size} is larger than the {info.num_examples} images of '
                    f'config.data ({info.path}); a stage-2 album needs at least one batch of photos.')
  _check_data_has_physical(config, info)
  encoder = ResNet18(config.model.code_dim)
  encoder_trains_stats = not _encoder_frozen(config)
  base = schedules.make_schedule(config.diffusion.noise_schedule, config.diffusion.num_timesteps)
  init, encode, denoise, generate, invert = networks(config)

  def loss_fn(params, batch, key):
    noise_key, dropout_key = jax.random.split(key)
    image, condition = batch['image'], conditioning(config, batch)
    stats = params['batch_stats']['encoder']
    code, updated = encoder.apply({'params': params['encoder'], 'batch_stats': stats}, image,
                                  train=encoder_trains_stats, mutable=['batch_stats'])
    model_fn = lambda x_t, t: denoise(params, x_t, t, condition, code, train=True, rngs={'dropout': dropout_key})
    per_example, aux = losses.diffusion_loss(base, model_fn, image, noise_key, learn_sigma=False,
                                             p2_gamma=config.diffusion.p2_gamma, p2_k=config.diffusion.p2_k)
    new_stats = updated['batch_stats'] if encoder_trains_stats else stats
    return per_example.mean(), {k: jnp.mean(v) for k, v in aux.items()}, {'batch_stats': {'encoder': new_stats}}

  def sample(params, key):
    """Reconstructions of the first config.sample.num examples of config.data from their buffers and codes."""
    batch = next(iter(pipeline.make_eval_iterator(config.data, local_batch_size=config.sample.num)))
    noise = jax.random.normal(key, batch['image'].shape)
    return generate(params, noise, conditioning(config, batch), encode(params, batch['image']))

  def edit(params, key, workdir):
    run_edits(config, params, key, workdir, generate, jax.jit(encode), invert)

  return System(init=init, loss_fn=loss_fn, sample=sample, commands={'edit': edit}, state_keys=('batch_stats',))


def read_example(path: str, where: str, resolution: int, physical: dict | None = None) -> dict:
  """An image in [-1, 1] and its buffers (the .npz beside it), checked as datasets are
  (data/rig_buffers.check_pair); light fitted and `rendered` computed when absent. The
  .npz must also hold the `physical` parts ({key: shape}) other than the light."""
  pixels = image_io.read_rgb(path, where)
  if pixels.shape[:2] != (resolution, resolution):
    raise UserError(f'{where}={path!r} is {pixels.shape[1]}x{pixels.shape[0]}; the model works at '
                    f'{resolution}x{resolution}.')
  buffers_path = os.path.splitext(path)[0] + '.npz'
  if not os.path.isfile(buffers_path):
    raise UserError(f'{where}={path!r} has no buffers {buffers_path!r} (normal, albedo, alpha, optional light).')
  with np.load(buffers_path) as f:
    stored = {k: f[k] for k in f.files}
  try:
    buffers = rig_buffers.check_pair(pixels, stored, estimate_light=True)
  except rig_buffers.BadPair as e:
    raise UserError(f'{where}: {buffers_path}: {e}') from None
  for key, shape in (physical or {}).items():
    if key != 'light' and np.shape(stored.get(key)) != shape:
      raise UserError(f"{where}: {buffers_path} has {key} of shape {np.shape(stored.get(key))}; "
                      f"config.model.condition='vector' needs {', '.join(f'{k} {s}' for k, s in physical.items())}.")
    buffers.setdefault(key, np.asarray(stored[key], np.float32))
  return dict(buffers, image=image_io.to_float(pixels))


def _read_light(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise UserError(f'config.edit.light={path!r}: no such file; give a .npy of SH coefficients [9, 3].')
  light = np.load(path)
  if light.shape != (9, 3):
    raise UserError(f'config.edit.light={path!r} holds an array of shape {light.shape}; SH lighting is (9, 3).')
  return light.astype(np.float32)


def _relit(example, light):
  return dict(example, light=light, rendered=np.asarray(
      sh_lighting.shade(example['normal'], example['albedo'], example['alpha'], light)))


def swapped_unet(config, unet_params):
  """The UNet of workdir config.edit.model_from (its latest checkpoint; EMA when its config samples
  with EMA) in place of `unet_params`, read through init_from's loader; UserError naming the
  differing config.model keys when its shapes differ."""
  given = config.edit.model_from
  where, path = f'config.edit.model_from={given!r}', os.path.abspath(os.path.expanduser(given))
  ckpt_dir, saved_config = os.path.join(path, 'checkpoints'), config_lib.saved_config(path)
  if checkpoint.latest_step(ckpt_dir) is None or saved_config is None:
    raise UserError(f'{where} is not a workdir with a finished checkpoint and its {config_lib.CONFIG_FILE}; give a '
                    'trained DiffusionRig workdir (e.g. another person\'s stage 2).')
  wanted = {f'params/unet/{n}': tuple(x.shape) for n, x in weights.flatten(unet_params).items()}
  saved = {n: s for n, s in checkpoint.saved_state_shapes(ckpt_dir).items() if n.startswith('params/unet/')}
  if saved != wanted:
    differing = [c for c in config_lib.changed_settings(config, path) if c.startswith('config.model.')]
    name = next(n for n in sorted(set(saved) | set(wanted)) if saved.get(n) != wanted.get(n))
    shown = '; '.join(differing[:3]) or f'{name}: {saved.get(name)} there, {wanted.get(name)} here'
    raise UserError(f'{where} holds a UNet of another shape than this config builds ({shown}); give a workdir '
                    'trained with the same config.model.')
  loaded = weights.read_source({'path': path, 'use_ema': saved_config['sample']['use_ema'],
                                 'where': 'config.edit.model_from'}, config)
  return jax.tree_util.tree_map_with_path(lambda p, _: jnp.asarray(loaded[f'unet/{sharding.path_name(p)}']),
                                          unet_params)


def run_edits(config, params, key, workdir, generate, encode, invert):
  """WORKDIR/edit/<input>_grid.png (input, its rendered / normal / albedo buffers, each edit) and
  <input>_<edit>.png per edit; all edits of an input start from one noise: a shared random one,
  or with config.edit.invert the input's DDIM inversion (by this run's model, its buffers and code)."""
  e, res = config.edit, config.model.image_size
  inputs = [p for p in e.input.split(',') if p]
  if not inputs:
    raise UserError('config.edit.input is empty; give one or more images (each with its .npz buffers).')
  sampler = config.sampler
  if e.invert and (sampler.name != 'ddim' or sampler.eta != 0 or sampler.steps < 2):
    raise UserError(f'config.edit.invert=True with config.sampler.name={sampler.name!r}, eta={sampler.eta}, '
                    f'steps={sampler.steps}; DDIM inversion gives back the input under ddim with eta=0 and at '
                    'least 2 steps.')
  parts = _physical_parts(config)
  source = lambda name: read_example(e[name], f'config.edit.{name}', res, parts) if e[name] else None
  light = _read_light(e.light) if e.light else None
  light_from, code_from, buffers_from = source('light_from'), source('code_from'), source('buffers_from')
  examples = [read_example(p, 'config.edit.input', res, parts) for p in inputs]  # all checked before any output
  if not any((light is not None, light_from, e.rotate_degrees, code_from, buffers_from, e.model_from)):
    raise UserError('config.edit: no edit asked for; set light, light_from, rotate_degrees, code_from, '
                    'buffers_from or model_from.')
  other_model = dict(params, unet=swapped_unet(config, params['unet'])) if e.model_from else None
  out_dir = os.path.join(workdir, 'edit')
  for i, (path, example) in enumerate(zip(inputs, examples)):
    code = encode(params, example['image'][None])[0]
    edits = [('reconstruction', example, code)]
    if light is not None:
      edits.append(('relight', _relit(example, light), code))
    if light_from:
      edits.append(('relight_from', _relit(example, light_from['light']), code))
    for degrees in e.rotate_degrees:
      turned = np.asarray(sh_lighting.rotate_light(example['light'], np.deg2rad(degrees)))
      edits.append((f'rotate{degrees:g}', _relit(example, turned), code))
    if code_from:
      edits.append(('code_swap', example, encode(params, code_from['image'][None])[0]))
    if buffers_from:
      swapped = (*rig_subjects.BUFFERS, *parts)
      edits.append(('buffer_swap', dict(example, **{k: buffers_from[k] for k in swapped}), code))
    condition = jnp.stack([_example_condition(config, ex) for _, ex, _ in edits])
    codes = jnp.stack([c for _, _, c in edits])
    if e.invert:  # edits[0] is the input as it is
      noise = invert(params, example['image'][None], condition[:1], codes[:1])
    else:
      noise = jax.random.normal(jax.random.fold_in(key, i), (1, res, res, 3))
    outputs = np.asarray(generate(params, jnp.broadcast_to(noise, (len(edits), res, res, 3)), condition, codes))
    if other_model is not None:
      edits.append(('model_swap', example, code))
      outputs = np.concatenate([outputs, generate(other_model, noise, condition[:1], codes[:1])])
    stem = os.path.splitext(os.path.basename(path))[0]
    shown = [example['image'], example['rendered'] * 2 - 1, example['normal'], example['albedo'] * 2 - 1]
    image_io.save_png(os.path.join(out_dir, f'{stem}_grid.png'),
                      image_io.image_grid(np.clip(np.stack([*shown, *outputs]), -1, 1)))
    for (name, _, _), output in zip(edits, outputs):
      image_io.save_png(os.path.join(out_dir, f'{stem}_{name}.png'), image_io.to_uint8(output[None])[0])
