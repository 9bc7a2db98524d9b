"""Plain ADM diffusion: guided-diffusion's UNet, ε/learned-variance loss, any sampler;
--mode=inpaint / outpaint / sdedit edit an input image (diffusion.editing.commands)."""

import jax
import jax.numpy as jnp

from visgen_jax.diffusion import editing, losses, samplers, schedules
from visgen_jax.errors import UserError, for_setting
from visgen_jax.models.adm_unet import ADMUNet, adm_layout
from visgen_jax.systems import System


def make_unet(model_config, compute_dtype='float32') -> ADMUNet:
  """ADMUNet from a config group (0 means 'off' for num_classes and code_dim)."""
  return ADMUNet(**model_config, dtype=jnp.dtype(compute_dtype))


def validate(config):
  res = config.data.resolution
  if res != config.model.image_size:
    raise UserError(f'config.data.resolution={res} differs from config.model.image_size={config.model.image_size}; '
                    'set them equal.')
  want_out = 6 if config.diffusion.learn_sigma else 3
  if config.model.out_channels != want_out:
    raise UserError(f'config.model.out_channels={config.model.out_channels} but learn_sigma='
                    f'{config.diffusion.learn_sigma} needs {want_out}.')
  with for_setting('config.model'):
    adm_layout(make_unet(config.model))
  samplers.from_config(config, schedules.make_schedule(config.diffusion.noise_schedule,
                                                       config.diffusion.num_timesteps))
  if config.sampler.guidance_scale:
    raise UserError('config.sampler.guidance_scale: classifier-free guidance needs a model trained with '
                    'condition dropout; the adm system is unconditional, leave it at 0.')


def make(config) -> System:
  res = config.data.resolution
  unet = make_unet(config.model, config.compute_dtype)
  base = schedules.make_schedule(config.diffusion.noise_schedule, config.diffusion.num_timesteps)
  sample_schedule, sample_options = samplers.from_config(config, base)

  def init(key, batch):
    x = batch['image']
    return unet.init(key, x, jnp.zeros(x.shape[:1], jnp.int32))['params']

  def loss_fn(params, batch, key):
    noise_key, dropout_key = jax.random.split(key)
    model_fn = lambda x_t, t: unet.apply({'params': params}, x_t, t, train=True,
                                         rngs={'dropout': dropout_key}).astype(jnp.float32)
    per_example, aux = losses.diffusion_loss(
        base, model_fn, batch['image'], noise_key, learn_sigma=config.diffusion.learn_sigma,
        p2_gamma=config.diffusion.p2_gamma, p2_k=config.diffusion.p2_k)
    return per_example.mean(), {k: jnp.mean(v) for k, v in aux.items()}

  def run_sampler(params, key, x_T, **options):
    denoise_fn = lambda x_t, t: unet.apply({'params': params}, x_t, t).astype(jnp.float32)
    return samplers.sample(config.sampler.name, key, denoise_fn, sample_schedule, x_T,
                           **sample_options, **options)

  @jax.jit
  def sample(params, key):
    noise_key, sample_key = jax.random.split(key)
    return run_sampler(params, sample_key, jax.random.normal(noise_key, (config.sample.num, res, res, 3)))

  return System(init=init, loss_fn=loss_fn, sample=sample,
                commands=editing.commands(config, run_sampler, sample_schedule.num_steps, (res, res),
                                          'model.image_size'))
