"""The one training loop for every system.

The state is a plain dict {step, params, opt_state, ema_params}; one jitted,
donated step updates it. Randomness inside the step is `fold_in(key, step)`, the
data position is saved with the state, so a resumed run computes exactly what an
uninterrupted run computes.
"""

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from visgen_jax.data import pipeline
from visgen_jax.errors import UserError
from visgen_jax.eval import build_evaluators, registered_types
from visgen_jax.systems import System, get_system
from visgen_jax.train import checkpoint, sharding
from visgen_jax.train import logging as vlog

# Independent streams from the one seed: fold_in(root, stream) then fold_in(step).
INIT_STREAM, TRAIN_STREAM, SAMPLE_STREAM = 0, 1, 2


def _say(message: str):
  """One line for the user from process 0, without breaking the progress bar."""
  if jax.process_index() == 0:
    tqdm.write(message)


def make_optimizer(opt, total_steps: int, trainable=None):
  """optax chain: clip -> adam(w)/sgd with warm-up and constant or cosine decay."""
  decay_steps = max(total_steps - opt.warmup_steps, 1)
  after = (optax.constant_schedule(opt.learning_rate) if opt.schedule == 'constant'
           else optax.cosine_decay_schedule(opt.learning_rate, decay_steps))
  lr = (optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps), after],
                             [opt.warmup_steps]) if opt.warmup_steps else after)
  if opt.name == 'adamw':
    base = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
  elif opt.name == 'adam':
    base = optax.adam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  else:
    base = optax.sgd(lr, momentum=opt.b1)
  tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), base) if opt.grad_clip else base
  if trainable is not None:
    tx = optax.multi_transform({True: tx, False: optax.set_to_zero()}, trainable)
  return tx, lr


@dataclasses.dataclass
class Setup:
  """Everything train / sample / eval share: built before anything is written."""
  config: object
  system: System
  mesh: object
  tx: object
  lr: object
  abstract_state: dict
  state_shardings: dict
  root_key: object
  evaluators: dict  # config.evals built: instance name -> evaluate(params, step)


def setup(config) -> Setup:
  mesh = sharding.make_mesh(config.mesh)
  batch_ways = mesh.shape['data'] * mesh.shape['fsdp']
  if config.batch_size % batch_ways or config.batch_size % jax.process_count():
    raise UserError(f'config.batch_size={config.batch_size} must be divisible by the {batch_ways} '
                    f'data x fsdp devices and the {jax.process_count()} processes.')
  system = get_system(config)
  tx, lr = make_optimizer(config.optimizer, config.total_steps, system.trainable)
  root = jax.random.key(config.seed)
  example = pipeline.example_batch(config.data, config.batch_size)
  abstract = jax.eval_shape(lambda k, b: _init_state(system, tx, k, b), root, example)
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules)
  evaluators = build_evaluators(config, system)
  return Setup(config, system, mesh, tx, lr, abstract, shardings, root, evaluators)


def _init_state(system, tx, key, batch):
  params = system.init(key, batch)
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
          'ema_params': params}


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_train_step(s: Setup):
  config, system, tx = s.config, s.system, s.tx
  compute_dtype = jnp.dtype(config.compute_dtype)
  ema_decay = config.optimizer.ema_decay
  train_key = jax.random.fold_in(s.root_key, TRAIN_STREAM)

  def step_fn(state, batch):
    key = jax.random.fold_in(train_key, state['step'])

    def loss(params):
      # bf16 compute: the cast is inside the differentiated function, so the
      # gradients (and the update) stay float32 on the master weights.
      return system.loss_fn(_cast(params, compute_dtype), batch, key)

    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state['ema_params'], params)
    metrics = {'loss': value, 'grad_norm': optax.global_norm(grads),
               'learning_rate': s.lr(state['step']), **aux}
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state, 'ema_params': ema}
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(s.state_shardings, sharding.batch_sharding(s.mesh)),
                 out_shardings=(s.state_shardings, sharding.replicated(s.mesh)), donate_argnums=0)


def _global_batch(mesh, local_batch: dict):
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local_batch.items()}


def _params_and_key(s: Setup, state, step: int):
  """What inference uses: EMA (or raw) parameters and a key that depends only on the step."""
  params = state['ema_params'] if s.config.sample.use_ema else state['params']
  return params, jax.random.fold_in(jax.random.fold_in(s.root_key, SAMPLE_STREAM), step)


def draw_samples(s: Setup, state, step: int):
  """config.sample.num images in [-1, 1], on the host."""
  return jax.device_get(s.system.sample(*_params_and_key(s, state, step)))


def _save_samples(s: Setup, state, step, workdir, writer):
  images = draw_samples(s, state, step)
  grid = vlog.image_grid(images)
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
    vlog.save_png(os.path.join(workdir, 'samples', f'step_{step:07d}.png'), grid)
  writer.write_images(step, 'samples', grid)


def _loop(s: Setup, state, start, data_iter, train_step, ckpt, writer, bar, workdir):
  config = s.config
  last_time, last_step = time.perf_counter(), start
  for step in range(start + 1, config.total_steps + 1):
    state, metrics = train_step(state, _global_batch(s.mesh, next(data_iter)))
    bar.update(1)
    if step % config.log_every == 0 or step == config.total_steps:
      metrics = jax.device_get(metrics)  # the only host sync: once per log interval
      now = time.perf_counter()
      seconds_per_step = (now - last_time) / (step - last_step)
      metrics.update(step_time=seconds_per_step, images_per_sec=config.batch_size / seconds_per_step)
      last_time, last_step = now, step
      writer.write(step, metrics)
      bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    if step % config.ckpt_every == 0 or step == config.total_steps:
      ckpt.save(step, state, data_iter.get_state())
    if s.system.sample and config.sample_every and (step % config.sample_every == 0 or step == config.total_steps):
      _save_samples(s, state, step, workdir, writer)
    if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
      writer.write(step, run_evaluators(s, state, step))
  return state


def _with_pretrained(s: Setup, state):
  """A fresh `state` with `System.load_pretrained` applied: each leaf it replaces
  goes into both params and EMA params, placed with the state's shardings."""
  initial, shardings = state['params'], s.state_shardings
  loaded = s.system.load_pretrained(initial)

  def place(new, old, sharding):
    host = jax.device_get(jnp.asarray(new, old.dtype))
    if host.shape != old.shape:
      raise ValueError(f'System.load_pretrained returned shape {host.shape} for a parameter of shape {old.shape}.')
    # From host data every process holds: placement works on any mesh, also across processes.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  params = jax.tree.map(lambda new, old, sh: old if new is old else place(new, old, sh),
                        loaded, initial, shardings['params'])
  ema = jax.tree.map(lambda new, old, e, sh: e if new is old else place(new, old, sh),
                     loaded, initial, state['ema_params'], shardings['ema_params'])
  return dict(state, params=params, ema_params=ema)


def train(config, workdir: str):
  s = setup(config)
  data_iter = pipeline.make_train_iterator(
      config.data, local_batch_size=config.batch_size // jax.process_count(), seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  # Nothing is written to the workdir before this point: every config mistake has surfaced.
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  start = ckpt.latest_step()
  if start is None:
    start = 0
    example = _global_batch(s.mesh, pipeline.example_batch(config.data, config.batch_size // jax.process_count()))
    init_key = jax.random.fold_in(s.root_key, INIT_STREAM)
    state = jax.jit(lambda k, b: _init_state(s.system, s.tx, k, b),
                    out_shardings=s.state_shardings)(init_key, example)
    if s.system.load_pretrained:
      state = _with_pretrained(s, state)
  else:
    state, data_state = ckpt.restore(start, checkpoint.abstract_like(s.abstract_state, s.state_shardings))
    data_iter.set_state(data_state)
    _say(f'Resumed from step {start} in {workdir}')

  train_step = make_train_step(s)
  writer = vlog.MetricWriter(workdir)
  bar = tqdm(total=config.total_steps, initial=start, disable=jax.process_index() != 0, unit='step',
             dynamic_ncols=True)
  try:
    state = _loop(s, state, start, data_iter, train_step, ckpt, writer, bar, workdir)
  finally:
    bar.close()
    ckpt.close()  # waits for the last asynchronous save, also when the loop failed
    writer.close()
  return state


def restore_latest(s: Setup, workdir: str):
  """(state, step) of the latest checkpoint under workdir, for inference."""
  directory = os.path.join(workdir, 'checkpoints')
  ckpt = checkpoint.Checkpointer(directory, s.config.keep_checkpoints) if os.path.isdir(directory) else None
  step = ckpt.latest_step() if ckpt else None
  if step is None:
    raise UserError(f'--workdir={workdir}: no checkpoint under {directory}; train first with --mode=train.')
  state, _ = ckpt.restore(step, checkpoint.abstract_like(s.abstract_state, s.state_shardings))
  ckpt.close()
  return state, step


def run_command(config, workdir: str, mode: str):
  """--mode=sample, eval or one of the system's commands, on the latest checkpoint."""
  if mode == 'eval' and not config.evals:
    raise UserError('--mode=eval needs evaluators and config.evals is empty; add one to the config '
                    f'as config.evals.NAME = {{type, ...}} with a type among: {", ".join(registered_types())}.')
  s = setup(config)
  commands = {'sample': None, 'eval': None, **s.system.commands}
  if mode not in commands:
    raise UserError(f'--mode={mode} is not one of: train, {", ".join(commands)}.')
  state, step = restore_latest(s, workdir)
  if mode == 'sample':
    _sample_to_pngs(s, state, workdir)
  elif mode == 'eval':
    _evaluate_to_json(s, state, step, workdir)
  else:
    commands[mode](*_params_and_key(s, state, step), workdir)


def _sample_to_pngs(s: Setup, state, workdir: str):
  """config.sample.num images, one PNG each plus a grid."""
  step = int(jax.device_get(state['step']))
  images = draw_samples(s, state, step)
  if jax.process_index() != 0:
    return
  out = os.path.join(workdir, 'samples', f'sample_step{step}')
  os.makedirs(out, exist_ok=True)
  for i, image in enumerate(vlog.to_uint8(images)):
    vlog.save_png(os.path.join(out, f'{i:05d}.png'), image)
  vlog.save_png(os.path.join(out, 'grid.png'), vlog.image_grid(images))
  _say(f'Wrote {len(images)} samples to {out}')


def run_evaluators(s: Setup, state, step: int) -> dict:
  """Every evaluator of config.evals on the inference parameters (EMA or raw, as for samples)."""
  params, _ = _params_and_key(s, state, step)
  results = {}
  for evaluate in s.evaluators.values():
    results.update(evaluate(params, step))
  return results


def _evaluate_to_json(s: Setup, state, step: int, workdir: str):
  """WORKDIR/eval/step_<N>.json and the same as one JSON line on stdout, from process 0."""
  results = {'step': step, **run_evaluators(s, state, step)}
  if jax.process_index() == 0:
    vlog.save_json(os.path.join(workdir, 'eval', f'step_{step:07d}.json'), results)
    print(json.dumps(results), flush=True)
