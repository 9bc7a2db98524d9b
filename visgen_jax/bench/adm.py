"""ADM benchmark: `python -m visgen_jax.bench adm`.

Training images/s and DDIM-50 sampling images/s of the Flax ADM UNet (through
the project's own trainer step and sampler) and of guided_diffusion's PyTorch
UNetModel + GaussianDiffusion, on this CPU, same architecture, same weights,
same batch and thread count, measured side by side in one run. The
architecture is configs/adm_ffhq256.py's (scale-shift norm, resblock_updown,
learned σ, attention at 16) at 64² with 64 channels, so a 2-core CPU finishes.

`side_by_side` times the training step alone, the step without the 3x3 convolutions'
filter gradients (their kernels frozen on both sides: where the remaining gap is) and the
UNet's eval forward (a sampler step's network call), each side's call right after the other's; `parts` times each part
of a training step (loss forward, forward + backward, Adam + EMA, the whole step) on both
sides (both: interleaved repeats, medians of wall and of process CPU time: CPU time is the
steadier figure on a loaded machine), and `top_ops` lists where one training step spends
its time: XLA's thunks from a JAX profiler trace (named by the op
at the root of each fusion) beside torch.profiler's table.

VISGEN_BENCH_ADM_MEMORY=1 adds `memory_256`: the peak memory of one training
step of configs/adm_ffhq256.py's paper-size UNet at 256², batch 4 (Flax: the
compiled step's memory analysis; torch: peak RSS of a subprocess running one
step, minus its RSS before building the model). It compiles and runs the big
model, a few minutes on 2 cores.
"""

import collections
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from visgen_jax.bench.common import best_time, flops_report, torch_op_profile, trace_event_ms
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
# configs/adm_ffhq256.py as the paper trains it, at batch 4 (the memory figure).
PAPER_OVERRIDES = ('batch_size=4', 'data.name=sample_faces', 'diffusion.p2_gamma=0.0', 'mesh.data=1')
TOP_OPS = 12
# torch's threads; XLA's CPU client uses every core unless XLA_FLAGS=--xla_cpu_multi_thread_eigen=false,
# which goes with OMP_NUM_THREADS=1 for a one-core comparison (steadier on a shared machine).
THREADS = int(os.environ.get('OMP_NUM_THREADS', os.cpu_count()))


def _config(overrides=OVERRIDES, variant=':tiny'):
  # p2_gamma 0 and no clipping: exactly guided_diffusion's hybrid loss and Adam step.
  return config_lib.load_config(os.path.join(os.path.dirname(__file__), '..', '..', 'configs',
                                             'adm_ffhq256.py') + variant, overrides)


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


def _median_times(fns: dict, repeats: int) -> dict:
  """{name: {'wall_s', 'cpu_s'}}: medians over `repeats` rounds that call every fn in turn."""
  for fn in fns.values():
    fn()
  wall, cpu = collections.defaultdict(list), collections.defaultdict(list)
  for _ in range(repeats):
    for name, fn in fns.items():
      start_wall, start_cpu = time.perf_counter(), time.process_time()
      fn()
      wall[name].append(time.perf_counter() - start_wall)
      cpu[name].append(time.process_time() - start_cpu)
  return {name: {'wall_s': statistics.median(wall[name]), 'cpu_s': statistics.median(cpu[name])} for name in fns}


class _Flax:
  """The project's trainer step and its parts on the bench model."""

  def __init__(self, config):
    self.s = s = trainer.setup(config)
    self.step = trainer.make_train_step(s)
    self.batch = {'image': jax.random.uniform(jax.random.key(0), (BATCH, SIZE, SIZE, 3), minval=-1, maxval=1),
                  'index': jnp.arange(BATCH, dtype=jnp.int32)}
    init = jax.jit(lambda k, b: trainer._init_state(s.system, s.tx, s.trainable, k, b),
                   out_shardings=s.state_shardings)
    self.state = init(jax.random.key(0), self.batch)
    loss = lambda p: s.system.loss_fn(p, self.batch, jax.random.key(1))[0]
    self.loss = jax.jit(loss)
    self.grad = jax.jit(jax.grad(loss))
    decay = config.optimizer.ema_decay

    def update(state, grads):  # what the step does after the gradients
      updates, opt_state = s.tx.update(grads, state['opt_state'], state['params'])
      params = optax.apply_updates(state['params'], updates)
      ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state['ema_params'], params)
      return dict(state, params=params, opt_state=opt_state, ema_params=ema)

    self.update = jax.jit(update, donate_argnums=0)
    self.grads = self.grad(self.state['params'])

  def train_step(self):
    self.state, (metrics, _) = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)

  def parts(self):
    return {'loss_forward': lambda: jax.block_until_ready(self.loss(self.state['params'])),
            'forward_backward': lambda: jax.block_until_ready(self.grad(self.state['params'])),
            'optimizer_ema': self._update, 'train_step': self.train_step}

  def _update(self):
    self.state = self.update(self.state, self.grads)
    jax.block_until_ready(self.state['step'])


class _Torch:
  """guided_diffusion's training step (as its TrainLoop: loss, backward, Adam, EMA) and its parts."""

  def __init__(self, config, torch, model, diffusion, image):
    from guided_diffusion.nn import update_ema
    self.torch, self.model, self.diffusion = torch, model, diffusion
    self.update_ema, self.decay = update_ema, config.optimizer.ema_decay
    self.opt = torch.optim.Adam(model.parameters(), lr=config.optimizer.learning_rate)
    self.ema = [p.detach().clone() for p in model.parameters()]
    self.x = torch.from_numpy(np.asarray(image).transpose(0, 3, 1, 2).copy())
    model.train()

  def _loss(self):
    t = self.torch.randint(0, self.diffusion.num_timesteps, (BATCH,))
    return self.diffusion.training_losses(self.model, self.x, t)['loss'].mean()

  def loss_forward(self):
    with self.torch.no_grad():
      self._loss()

  def forward_backward(self):
    self.opt.zero_grad()
    self._loss().backward()

  def optimizer_ema(self):
    self.opt.step()
    self.update_ema(self.ema, self.model.parameters(), self.decay)

  def train_step(self):
    self.forward_backward()
    self.optimizer_ema()

  def parts(self):
    return {'loss_forward': self.loss_forward, 'forward_backward': self.forward_backward,
            'optimizer_ema': self.optimizer_ema, 'train_step': self.train_step}


def train_images_per_s(ours: _Flax, theirs: _Torch, repeats=3):
  return BATCH / best_time(ours.train_step, repeats), BATCH / best_time(theirs.train_step, repeats)


def _flax_unet(config, model):
  """The Flax UNet and torch `model`'s weights converted for it."""
  unet = make_unet(config.model)
  return unet, jax.device_put(convert_unet_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, unet))


def ddim50_images_per_s(config, torch, model, ddim, repeats=1):
  unet, params = _flax_unet(config, model)
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


def side_by_side(config, ours: _Flax, theirs: _Torch, torch, model, repeats=5) -> dict:
  """The training step alone, the step without the 3x3 convolutions' filter gradients (their
  kernels frozen: `config.frozen` here, requires_grad=False there) and the UNet's eval forward
  (one sampler step's network call), each side's call right after the other's; medians, with
  ratios torch / flax. The first two give each side's filter-gradient seconds per step."""
  unet, params = _flax_unet(config, model)
  x = jax.random.normal(jax.random.key(1), (BATCH, SIZE, SIZE, 3))
  t = jnp.full((BATCH,), config.diffusion.num_timesteps // 2)
  forward = jax.jit(lambda p, x, t: unet.apply({'params': p}, x, t))
  torch_x = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  torch_t = torch.from_numpy(np.asarray(t))

  def torch_forward():
    model.eval()
    with torch.no_grad():
      model(torch_x, torch_t)
    model.train()

  frozen_config = config.copy_and_resolve_references()
  frozen_config.frozen = (r'conv/kernel$',)
  ours_frozen = _Flax(frozen_config)
  frozen_model = copy.deepcopy(model)
  for p in frozen_model.parameters():
    p.requires_grad_(p.ndim != 4 or p.shape[-1] != 3)
  theirs_frozen = _Torch(config, torch, frozen_model, theirs.diffusion, ours.batch['image'])
  times = _median_times({'flax/train_step': ours.train_step, 'torch/train_step': theirs.train_step,
                         'flax/train_step_3x3_kernels_frozen': ours_frozen.train_step,
                         'torch/train_step_3x3_kernels_frozen': theirs_frozen.train_step,
                         'flax/eval_forward': lambda: jax.block_until_ready(forward(params, x, t)),
                         'torch/eval_forward': torch_forward}, repeats)
  out = {name: {'flax': times[f'flax/{name}'], 'torch': times[f'torch/{name}'],
                'speed_ratio_wall': times[f'torch/{name}']['wall_s'] / times[f'flax/{name}']['wall_s'],
                'speed_ratio_cpu': times[f'torch/{name}']['cpu_s'] / times[f'flax/{name}']['cpu_s']}
         for name in ('train_step', 'train_step_3x3_kernels_frozen', 'eval_forward')}
  out['filter_gradients_wall_s'] = {side: times[f'{side}/train_step']['wall_s']
                                    - times[f'{side}/train_step_3x3_kernels_frozen']['wall_s']
                                    for side in ('flax', 'torch')}
  return out


def parts(ours: _Flax, theirs: _Torch, repeats=3) -> dict:
  """Seconds per part of a training step, both sides interleaved, with ratios torch / flax."""
  fns = {f'{side}/{name}': fn for side, impl in (('flax', ours), ('torch', theirs))
         for name, fn in impl.parts().items()}
  times = _median_times(fns, repeats)
  out = {}
  for name in ours.parts():
    f, t = times[f'flax/{name}'], times[f'torch/{name}']
    out[name] = {'flax': f, 'torch': t, 'speed_ratio_wall': t['wall_s'] / f['wall_s'],
                 'speed_ratio_cpu': t['cpu_s'] / f['cpu_s']}
  return out


def _hlo_ops(compiled_text: str) -> dict:
  """{instruction name: 'op shape'}: for a fusion, the op at the root of the fused computation."""
  roots, computation = {}, None
  for line in compiled_text.splitlines():
    header = re.match(r'^(?:ENTRY )?%(\S+) ', line)
    if header:
      computation = header.group(1)
    elif line.lstrip().startswith('ROOT '):
      roots[computation] = line
  ops = {}
  for line in compiled_text.splitlines():
    m = re.match(r'\s+(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(', line)
    if not m:
      continue
    name, shape, op = m.groups()
    if op == 'fusion':
      line = roots.get(re.search(r'calls=%([\w.-]+)', line).group(1), '')
      root_op = re.search(r'= \S+ ([\w-]+)\(', line)
      op = root_op.group(1) if root_op else op
    window = re.search(r'window=\{size=([\dx]+)', line)
    ops[name] = f'{op} {shape.split("{")[0]}' + (f' window {window.group(1)}' if window else '')
  return ops


def flax_top_ops(ours: _Flax, n=TOP_OPS) -> dict:
  """Thunk times of one training step from a JAX profiler trace, by op kind and the n slowest.

  Trace times are wall durations of the thunks (on a loaded machine they include waiting). A
  convolution with a window as large as the image is a filter gradient.
  """
  ops = _hlo_ops(ours.step.lower(ours.state, ours.batch).compile().as_text())
  per_thunk = collections.Counter({name: ms for name, ms in trace_event_ms(ours.train_step).items() if name in ops})
  total = sum(per_thunk.values())
  kinds = collections.Counter()
  for name, ms in per_thunk.items():
    op = ops[name].split()[0]
    kinds['convolution (filter gradient)' if op == 'convolution' and ops[name].split()[-1] not in
          ('1x1', '3x3') else op] += ms
  return {'total_ms': total,
          'by_op_kind_ms': {k: round(v, 1) for k, v in kinds.most_common()},
          'slowest': [{'thunk': name, 'op': ops[name], 'ms': round(ms, 1)} for name, ms in per_thunk.most_common(n)]}


_TORCH_MEMORY = '''
import json, resource, sys, numpy as np, torch
from visgen_jax.bench import adm
config = adm._config(adm.PAPER_OVERRIDES, '')
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.set_num_threads({threads})
torch_, model, diffusion, _ = adm._torch_setup(config)
size = config.data.resolution
step = adm._Torch(config, torch, model, diffusion, np.zeros((adm.BATCH, size, size, 3), np.float32))
step.train_step()
print(json.dumps({{'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  'rss_before_model_bytes': before * 1024}}))
'''


def _compiled_step_memory(config) -> dict:
  """Bytes of one compiled training step (XLA's memory analysis: nothing runs)."""
  s = trainer.setup(config)
  size = config.data.resolution
  batch = {'image': jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32),
           'index': jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
  stats = trainer.make_train_step(s).lower(s.abstract_state, batch).compile().memory_analysis()
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.abstract_state))
  return {'peak_bytes': int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                            - stats.alias_size_in_bytes),
          'temp_bytes': int(stats.temp_size_in_bytes), 'state_bytes': int(state_bytes)}


def memory_256() -> dict:
  """Peak memory of one training step of the paper-size UNet at 256², batch 4: Flax as configured
  and with model.remat (each ResBlock recomputed in the backward pass), torch's peak RSS."""
  flax = {'plain': _compiled_step_memory(_config(PAPER_OVERRIDES, '')),
          'remat': _compiled_step_memory(_config(PAPER_OVERRIDES + ('model.remat=True',), ''))}
  proc = subprocess.run([sys.executable, '-c', _TORCH_MEMORY.format(threads=THREADS)],
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  if proc.returncode:
    raise RuntimeError(f'the torch memory subprocess failed:\n{proc.stderr[-4000:]}')
  rss = json.loads(proc.stdout.strip().splitlines()[-1])
  torch_peak = rss['peak_rss_bytes'] - rss['rss_before_model_bytes']
  return {'model': 'configs/adm_ffhq256.py (128 ch, mult 1,1,2,2,4,4), 256x256, batch 4',
          'flax': flax, 'torch': {'peak_rss_above_interpreter_bytes': torch_peak, **rss},
          'ratio_flax_over_torch': {k: v['peak_bytes'] / torch_peak for k, v in flax.items()}}


def run() -> dict:
  config = _config()
  torch, model, diffusion, ddim = _torch_setup(config)
  torch.set_num_threads(THREADS)
  ours = _Flax(config)
  theirs = _Torch(config, torch, model, diffusion, ours.batch['image'])
  train_ours, train_theirs = train_images_per_s(ours, theirs)
  sample_ours, sample_theirs = ddim50_images_per_s(config, torch, model, ddim)
  result = {
      'machine': (f'{os.cpu_count()} CPU cores, torch threads {THREADS}, jax {jax.__version__} '
                  f'({jax.default_backend()}), torch {torch.__version__}'),
      'load_average': os.getloadavg(),
      'model': f'ADM {SIZE}x{SIZE}, 64 ch, mult 1,2,2, 2 res blocks, attention at 16, learned sigma, batch {BATCH}',
      'train_images_per_s': {'flax': train_ours, 'torch': train_theirs, 'ratio': train_ours / train_theirs},
      'ddim50_images_per_s': {'flax': sample_ours, 'torch': sample_theirs, 'ratio': sample_ours / sample_theirs},
      'ddim_step_s': {'flax': 1 / sample_ours * BATCH / 50, 'torch': 1 / sample_theirs * BATCH / 50},
      'train_step_flops': flops_report(ours.step, (ours.state, ours.batch), BATCH / train_ours,
                                       dtype=config.compute_dtype),
      'side_by_side': side_by_side(config, ours, theirs, torch, model),
      'parts': parts(ours, theirs),
      'top_ops': {'flax': flax_top_ops(ours), 'torch': torch_op_profile(theirs.train_step, calls=1, top=TOP_OPS)},
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  if os.environ.get('VISGEN_BENCH_ADM_MEMORY') == '1':
    result['memory_256'] = memory_256()
  return result
