"""The one training loop for every system.

The state is a plain dict {step, params, opt_state, ema_params}; one jitted,
donated step updates it. Randomness inside the step is `fold_in(key, step)`, the
data position is saved with the state, so a resumed run computes exactly what an
uninterrupted run computes. Parameters that `config.frozen` matches get no
gradient, optimizer moments or EMA copy (optax.MaskedNode in their place); a
fresh run starts from `config.init_from` (visgen_jax.train.weights). With
optimizer.ema_decay = 0 no EMA copy is kept at all: sampling, evaluation and
init_from sources with use_ema then take the raw parameters, which such an EMA equals.

Model state (e.g. BatchNorm statistics): the top-level params keys a system
names in `System.state_keys` are not trained. They get no gradient, optimizer
moments or EMA copy, like frozen parameters; the loss_fn returns their new
values (third output) and the step stores them in params, unless config.frozen
matches them, which keeps them bit-identical. So they live in the state's
params, checkpoints and init_from sources like any parameter, and inference
(EMA or raw) uses their latest values. The step is jitted on global arrays,
so batch statistics are over the global batch also under data sharding.

A loss or gradient norm that is not finite stops the run at the next log,
checkpoint or sample point, before anything is saved: the last checkpoint
written holds the last finite parameters.
"""

import dataclasses
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from visgen_jax import image_io
from visgen_jax.data import pipeline
from visgen_jax.errors import TrainingDiverged, UserError
from visgen_jax.eval import build_evaluators, registered_types
from visgen_jax.systems import System, get_system
from visgen_jax.train import checkpoint, sharding, weights
from visgen_jax.train import config as config_lib
from visgen_jax.train import logging as vlog

# Independent streams from the one seed: fold_in(root, stream) then fold_in(step).
INIT_STREAM, TRAIN_STREAM, SAMPLE_STREAM = 0, 1, 2


def _say(message: str):
  """One line for the user from process 0, without breaking the progress bar."""
  if jax.process_index() == 0:
    tqdm.write(message)


def scale_by_path(multipliers):
  """Multiplies the update of every parameter whose '/'-joined path a regex of `multipliers`
  ((regex, factor) pairs, first match wins) matches by its factor: after adam(w) or sgd this is a
  learning rate (and weight decay) of lr·factor for that group, as torch's per-group lr gives."""
  compiled = [(re.compile(pattern), float(factor)) for pattern, factor in multipliers]

  def factor(path):
    name = sharding.path_name(path)
    return next((f for pattern, f in compiled if pattern.search(name)), 1.0)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda path, u: u * factor(path), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt, total_steps: int):
  """optax chain: clip -> adam(w)/sgd with warm-up and constant, linear (to 0) or cosine decay
  -> per-parameter-group lr factors (opt.lr_multipliers)."""
  decay_steps = max(total_steps - opt.warmup_steps, 1)
  after = (optax.constant_schedule(opt.learning_rate) if opt.schedule == 'constant'
           else optax.linear_schedule(opt.learning_rate, 0.0, decay_steps) if opt.schedule == 'linear'
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
  multipliers = opt.get('lr_multipliers', ())
  return (optax.chain(tx, scale_by_path(multipliers)) if multipliers else tx), lr


@dataclasses.dataclass
class Setup:
  """Everything train / sample / eval share: built before anything is written."""
  config: object
  system: System
  mesh: object
  tx: object
  lr: object
  trainable: object  # a tree of bools like the params: False where config.frozen matches or model state
  unfrozen: object  # a tree of bools like the params: False where config.frozen matches
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
  tx, lr = make_optimizer(config.optimizer, config.total_steps)
  root = jax.random.key(config.seed)
  example = pipeline.example_batch(config.data, config.batch_size)
  params = jax.eval_shape(system.init, root, example)
  weights.check_frozen(config.frozen, params)
  weights.check_lr_multipliers(config.optimizer.lr_multipliers, params)
  unfrozen = weights.trainable_mask(params, config.frozen)
  trainable = dict(unfrozen, **{k: jax.tree.map(lambda _: False, unfrozen[k]) for k in system.state_keys})
  abstract = jax.eval_shape(lambda k, b: _init_state(system, tx, trainable, k, b, _keeps_ema(config)),
                            root, example)
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules)
  evaluators = build_evaluators(config, system)
  return Setup(config, system, mesh, tx, lr, trainable, unfrozen, abstract, shardings, root, evaluators)


def _keeps_ema(config) -> bool:
  # An EMA of decay 0 is the raw parameters: no copy is kept (inference merges the raw ones in).
  return config.optimizer.ema_decay > 0


def _init_state(system, tx, trainable, key, batch, keep_ema=True):
  params = system.init(key, batch)
  train_params = weights.only(params, trainable)
  ema = train_params if keep_ema else jax.tree.map(lambda _: optax.MaskedNode(), train_params)
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(train_params), 'ema_params': ema}


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_train_step(s: Setup):
  config, system, tx = s.config, s.system, s.tx
  compute_dtype = jnp.dtype(config.compute_dtype)
  ema_decay = config.optimizer.ema_decay
  train_key = jax.random.fold_in(s.root_key, TRAIN_STREAM)

  def step_fn(state, batch):
    key = jax.random.fold_in(train_key, state['step'])

    def loss(train_params):
      # bf16 compute: the cast is inside the differentiated function, so the
      # gradients (and the update) stay float32 on the master weights.
      params = weights.merge(train_params, state['params'])
      value, aux, *updated = system.loss_fn(_cast(params, compute_dtype), batch, key)
      return value, (aux, *updated)

    # Only the trainable parameters are differentiated: no weight gradients for frozen ones.
    train_params = weights.only(state['params'], s.trainable)
    (value, (aux, *updated)), grads = jax.value_and_grad(loss, has_aux=True)(train_params)
    updates, opt_state = tx.update(grads, state['opt_state'], train_params)
    train_params = optax.apply_updates(train_params, updates)
    ema = (jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state['ema_params'], train_params)
           if ema_decay else state['ema_params'])
    grad_norm = optax.tree.norm(grads)
    metrics = {'loss': value, 'grad_norm': grad_norm, 'learning_rate': s.lr(state['step']), **aux}
    params = weights.merge(train_params, state['params'])
    if system.state_keys:  # new model state, except where config.frozen keeps the old
      params.update({k: jax.tree.map(lambda new, old, keep_new: new.astype(old.dtype) if keep_new else old,
                                     updated[0][k], params[k], s.unfrozen[k]) for k in system.state_keys})
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state, 'ema_params': ema}
    return new_state, (metrics, jnp.stack([jnp.isfinite(value), jnp.isfinite(grad_norm)]))

  return jax.jit(step_fn, in_shardings=(s.state_shardings, sharding.batch_sharding(s.mesh)),
                 out_shardings=(s.state_shardings, (sharding.replicated(s.mesh),) * 2), donate_argnums=0)


def _global_batch(mesh, local_batch: dict):
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local_batch.items()}


def _params_and_key(s: Setup, state, step: int):
  """What inference uses: EMA (or raw) parameters and a key that depends only on the step."""
  params = weights.merge(state['ema_params'], state['params']) if s.config.sample.use_ema else state['params']
  return params, jax.random.fold_in(jax.random.fold_in(s.root_key, SAMPLE_STREAM), step)


def draw_samples(s: Setup, state, step: int):
  """config.sample.num images in [-1, 1], on the host."""
  return jax.device_get(s.system.sample(*_params_and_key(s, state, step)))


def _save_samples(s: Setup, state, step, workdir, writer):
  grid = image_io.image_grid(draw_samples(s, state, step))
  image_io.save_png(os.path.join(workdir, 'samples', f'step_{step:07d}.png'), grid)
  writer.write_images(step, 'samples', grid)


def _check_finite(pending, saved_step):
  """Raises TrainingDiverged at the first step in `pending` [(step, [loss finite,
  grad norm finite])] whose loss or gradient norm is not finite."""
  for step, finite in jax.device_get(pending):
    if not finite.all():
      what = 'loss' if not finite[0] else 'gradient norm'
      kept = f'the latest checkpoint (step {saved_step}) holds' if saved_step else 'no checkpoint was written with'
      raise TrainingDiverged(f'training diverged: the {what} is not finite (NaN or inf) at step {step}; stopped '
                             f'without saving, {kept} the last finite parameters. Lower '
                             'config.optimizer.learning_rate or check the data.')
  pending.clear()


def _loop(s: Setup, state, start, data_iter, train_step, ckpt, writer, bar, workdir):
  config = s.config
  last_time, last_step = time.perf_counter(), start
  pending, saved_step = [], start  # finiteness flags not yet looked at; the last step saved
  for step in range(start + 1, config.total_steps + 1):
    state, (metrics, finite) = train_step(state, _global_batch(s.mesh, next(data_iter)))
    pending.append((step, finite))
    bar.update(1)
    if step % config.log_every == 0 or step == config.total_steps:
      metrics = jax.device_get(metrics)  # the only host sync: once per log interval
      now = time.perf_counter()
      seconds_per_step = (now - last_time) / (step - last_step)
      metrics.update(step_time=seconds_per_step, images_per_sec=config.batch_size / seconds_per_step)
      last_time, last_step = now, step
      writer.write(step, metrics)
      bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
      _check_finite(pending, saved_step)
    if step % config.ckpt_every == 0 or step == config.total_steps:
      _check_finite(pending, saved_step)
      ckpt.save(step, state, data_iter.get_state())
      saved_step = step
    if s.system.sample and config.sample_every and (step % config.sample_every == 0 or step == config.total_steps):
      _check_finite(pending, saved_step)
      _save_samples(s, state, step, workdir, writer)
    if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
      _check_finite(pending, saved_step)
      writer.write(step, run_evaluators(s, state, step))
  return state


def _replace_params(s: Setup, state, replaced: dict):
  """A fresh `state` whose parameters named in `replaced` ({path: host array})
  take those values, in params and (trainable ones) EMA params, placed from host
  data with the state's shardings."""
  def place(path, old, sharding_):
    name = sharding.path_name(path)
    if name not in replaced:
      return old
    host = np.asarray(replaced[name], old.dtype)
    if host.shape != old.shape:
      raise ValueError(f'{name}: a start value of shape {host.shape} for a parameter of shape {old.shape}.')
    # From host data every process holds: placement works on any mesh, also across processes.
    return jax.make_array_from_callback(host.shape, sharding_, lambda index: host[index])

  params = jax.tree_util.tree_map_with_path(place, state['params'], s.state_shardings['params'])
  ema = jax.tree_util.tree_map_with_path(place, state['ema_params'], s.state_shardings['ema_params'])
  return dict(state, params=params, ema_params=ema)


def _computed_start(s: Setup, params) -> dict:
  """{path: value} of the leaves System.load_pretrained replaces (returns as other objects)."""
  loaded = s.system.load_pretrained(params)
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return {sharding.path_name(p): new for (p, old), new in zip(paths, jax.tree.leaves(loaded)) if new is not old}


def write_run_config(config, workdir: str):
  """The resolved config as WORKDIR/config.json (process 0, atomically): the run describes itself."""
  if jax.process_index() == 0:
    vlog.save_json(os.path.join(workdir, config_lib.CONFIG_FILE), config.to_dict())


def check_same_model(s: Setup, workdir: str):
  """UserError naming the config key when the latest checkpoint under workdir was
  trained with another architecture than this config builds."""
  saved = checkpoint.saved_state_shapes(os.path.join(workdir, 'checkpoints'))
  wanted = {sharding.path_name(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(s.abstract_state)[0]}
  if saved == wanted:
    return
  differing = config_lib.changed_settings(s.config, workdir)
  if differing:
    raise UserError(f'--workdir={workdir} holds a model of another shape than this config builds: '
                    f'{"; ".join(differing[:3])}; use the settings in {os.path.join(workdir, config_lib.CONFIG_FILE)} '
                    'or a new workdir.')
  name = next(k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k))
  raise UserError(f'--workdir={workdir} holds a model of another shape than this config builds ({name}: '
                  f'{saved.get(name)} in the checkpoint, {wanted.get(name)} here); use the config it was '
                  'trained with or a new workdir.')


def _check_frozen_are_loaded(s: Setup, replaced: dict):
  """UserError when config.frozen would keep parameters at their random initial values: a
  fresh run must load them (init_from, or the system's computed start)."""
  frozen = [n for n, keep in weights.flatten(s.unfrozen).items() if not keep and n not in replaced]
  if frozen and not s.system.load_pretrained:
    raise UserError(f'config.frozen={tuple(s.config.frozen)} keeps {len(frozen)} parameters ({frozen[0]}, ...) at '
                    'their random initial values: no config.init_from source gives them; add the run or '
                    'checkpoint to start from (--config.init_from=PATH).')


def train(config, workdir: str):
  s = setup(config)
  local_batch = config.batch_size // jax.process_count()
  if s.system.reads_batch:
    data_iter = pipeline.make_train_iterator(config.data, local_batch_size=local_batch, seed=config.seed,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count())
  else:
    data_iter = pipeline.ExampleIterator(config.data, local_batch)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  start = checkpoint.latest_step(ckpt_dir)
  if start is None:
    start = 0
    # Read and checked before anything is written: a bad source leaves no workdir behind.
    replaced = weights.initial_weights((*s.system.init_from, *config.init_from), config,
                                       s.abstract_state['params'])
    _check_frozen_are_loaded(s, replaced)
  else:
    check_same_model(s, workdir)
  # Nothing is written to the workdir before this point: every config mistake has surfaced.
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(ckpt_dir, config.keep_checkpoints)
  if start == 0:
    write_run_config(config, workdir)
    example = _global_batch(s.mesh, pipeline.example_batch(config.data, local_batch))
    init_key = jax.random.fold_in(s.root_key, INIT_STREAM)
    state = jax.jit(lambda k, b: _init_state(s.system, s.tx, s.trainable, k, b, _keeps_ema(config)),
                    out_shardings=s.state_shardings)(init_key, example)
    if s.system.load_pretrained:
      replaced.update(_computed_start(s, state['params']))
    if replaced:
      state = _replace_params(s, state, replaced)
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
  check_same_model(s, workdir)
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
  out = os.path.join(workdir, 'samples', f'sample_step{step}')
  image_io.save_pngs(out, images)
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
