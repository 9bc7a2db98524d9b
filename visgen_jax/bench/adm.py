"""ADM benchmark: `python -m visgen_jax.bench adm`.

Training images/s and DDIM-50 sampling images/s of the Flax ADM UNet (through
the project's own trainer step and sampler) and of guided_diffusion's PyTorch
UNetModel + GaussianDiffusion, on this CPU, same architecture, same weights,
same batch and thread count, measured side by side in one run. The
architecture is configs/adm_ffhq256.py's (scale-shift norm, resblock_updown,
learned σ, attention at 16) at 64² with 64 channels, so a 2-core CPU finishes.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.bench.common import best_time
from visgen_jax.convert.guided_diffusion import convert_unet_state_dict
from visgen_jax.diffusion import samplers, schedules
from visgen_jax.systems.adm import make_unet
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

BATCH = 4
SIZE = 64
OVERRIDES = (f'batch_size={BATCH}', f'data.resolution={SIZE}', f'model.image_size={SIZE}',
             'model.model_channels=64', 'model.channel_mult=1,2,2', 'model.num_res_blocks=2',
             'diffusion.p2_gamma=0.0', 'optimizer.grad_clip=0.0', 'mesh.data=1')


def _config():
  # p2_gamma 0 and no clipping: exactly guided_diffusion's hybrid loss and Adam step.
  return config_lib.load_config(os.path.join(os.path.dirname(__file__), '..', '..', 'configs',
                                             'adm_ffhq256.py') + ':tiny', OVERRIDES)


def _torch_setup(config):
  import torch
  from guided_diffusion import script_util
  m = config.model
  model = script_util.create_model(
      image_size=m.image_size, num_channels=m.model_channels, num_res_blocks=m.num_res_blocks,
      channel_mult=','.join(str(c) for c in m.channel_mult), learn_sigma=config.diffusion.learn_sigma,
      class_cond=False, use_checkpoint=False, attention_resolutions=','.join(map(str, m.attention_resolutions)),
      num_heads=m.num_heads, num_head_channels=m.num_head_channels, num_heads_upsample=m.num_heads_upsample,
      use_scale_shift_norm=m.use_scale_shift_norm, dropout=m.dropout, resblock_updown=m.resblock_updown,
      use_fp16=False, use_new_attention_order=m.use_new_attention_order)
  diffusion = script_util.create_gaussian_diffusion(
      steps=config.diffusion.num_timesteps, learn_sigma=config.diffusion.learn_sigma,
      noise_schedule=config.diffusion.noise_schedule)
  ddim = script_util.create_gaussian_diffusion(
      steps=config.diffusion.num_timesteps, learn_sigma=config.diffusion.learn_sigma,
      noise_schedule=config.diffusion.noise_schedule, timestep_respacing='ddim50')
  torch.manual_seed(0)
  return torch, model, diffusion, ddim


def train_images_per_s(config, torch, model, diffusion, repeats=3):
  s = trainer.setup(config)
  step = trainer.make_train_step(s)
  init = jax.jit(lambda k, b: trainer._init_state(s.system, s.tx, k, b), out_shardings=s.state_shardings)
  batch = {'image': jax.random.uniform(jax.random.key(0), (BATCH, SIZE, SIZE, 3), minval=-1, maxval=1),
           'index': jnp.arange(BATCH, dtype=jnp.int32)}
  state = [init(jax.random.key(0), batch)]

  def ours():
    state[0], metrics = step(state[0], batch)
    jax.block_until_ready(metrics)

  opt = torch.optim.Adam(model.parameters(), lr=config.optimizer.learning_rate)
  x = torch.from_numpy(np.asarray(batch['image']).transpose(0, 3, 1, 2).copy())
  model.train()

  def theirs():
    t = torch.randint(0, diffusion.num_timesteps, (BATCH,))
    loss = diffusion.training_losses(model, x, t)['loss'].mean()
    opt.zero_grad()
    loss.backward()
    opt.step()

  return BATCH / best_time(ours, repeats), BATCH / best_time(theirs, repeats)


def ddim50_images_per_s(config, torch, model, ddim, repeats=1):
  unet = make_unet(config.model)
  params = convert_unet_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, unet)
  schedule = schedules.respace(schedules.make_schedule(config.diffusion.noise_schedule,
                                                       config.diffusion.num_timesteps), 'ddim50')
  x_T = jax.random.normal(jax.random.key(1), (BATCH, SIZE, SIZE, 3))
  sample = jax.jit(lambda p, x: samplers.sample(
      'ddim', jax.random.key(2), lambda x_t, t: unet.apply({'params': p}, x_t, t), schedule, x,
      learn_sigma=config.diffusion.learn_sigma))
  ours = lambda: jax.block_until_ready(sample(params, x_T))
  model.eval()
  noise = torch.from_numpy(np.asarray(x_T).transpose(0, 3, 1, 2).copy())

  def theirs():
    with torch.no_grad():
      ddim.ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=True)

  return BATCH / best_time(ours, repeats), BATCH / best_time(theirs, repeats)


def run() -> dict:
  config = _config()
  torch, model, diffusion, ddim = _torch_setup(config)
  torch.set_num_threads(os.cpu_count())
  train_ours, train_theirs = train_images_per_s(config, torch, model, diffusion)
  sample_ours, sample_theirs = ddim50_images_per_s(config, torch, model, ddim)
  return {
      'machine': f'{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}',
      'model': f'ADM {SIZE}x{SIZE}, 64 ch, mult 1,2,2, 2 res blocks, attention at 16, learned sigma, batch {BATCH}',
      'train_images_per_s': {'flax': train_ours, 'torch': train_theirs, 'ratio': train_ours / train_theirs},
      'ddim50_images_per_s': {'flax': sample_ours, 'torch': sample_theirs, 'ratio': sample_ours / sample_theirs},
  }
