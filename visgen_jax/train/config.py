"""Experiment configs: the keys every config shares, loading, overrides, validation.

A config file is `configs/<experiment>.py` with `get_config(arg=None)`; `arg` is the
variant after the colon (`configs/adm_ffhq256.py:tiny`), applied with `variant`.
A config file may import the modules beside it (`import patchdm_base`): shared
settings live there. Overrides are `--config.key=value` (nested:
`--config.optimizer.learning_rate=3e-4`). Every mistake becomes a `UserError`
naming the key and what is allowed.
"""

import ast
import difflib
import importlib.util
import json
import os
import sys

import ml_collections

from visgen_jax.errors import UserError


def base_config() -> ml_collections.ConfigDict:
  """The keys every experiment has; a config file starts from this and fills in."""
  c = ml_collections.ConfigDict()
  c.system = ''  # the recipe in visgen_jax.systems that supplies model, loss and sampler
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 8  # global, over all processes and devices
  c.log_every = 50
  c.ckpt_every = 1000
  c.sample_every = 1000  # 0 = never during training
  c.eval_every = 0  # runs config.evals during training; 0 = never
  c.keep_checkpoints = 3
  c.compute_dtype = 'float32'  # or 'bfloat16': parameters stay float32 (master weights)
  # Weights a fresh run starts from (never applied on resume): workdirs, converted parameter
  # directories or foreign checkpoint files, each a path or {path, select, rename, use_ema}
  # (visgen_jax/train/weights.py); --config.init_from=PATH is one source with the defaults.
  c.init_from = ()
  # Regexes of '/'-joined parameter paths that do not train (no optimizer state, no EMA copy).
  c.frozen = ()

  # Device mesh: axis sizes; -1 takes the remaining devices. The batch is split
  # over data x fsdp; parameters are split over fsdp when fsdp > 1.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  # Parameter placement: (regex on the '/'-joined parameter path, axis names per
  # dimension as a comma list, '' = not split) pairs, first match wins; parameters
  # no rule matches are split over 'fsdp' on their largest divisible dimension.
  c.sharding_rules = ()

  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw',  # adamw | adam | sgd
      learning_rate=1e-4,
      schedule='constant',  # constant | linear (to 0) | cosine
      warmup_steps=0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0,  # global norm; 0 = off
      # (regex over '/'-joined parameter paths, factor) pairs, first match wins: those parameters
      # train at learning_rate·factor (e.g. (('^backbone/', 0.1),)); the rest at learning_rate.
      lr_multipliers=(),
      ema_decay=0.9999,
  ))

  c.data = ml_collections.ConfigDict(dict(
      name='sample',  # sample | sample_faces | folder
      path='',  # a dataset built by data_prep/ (for name='folder')
      resolution=64,
      random_flip=True,
      random_crop=False,
      worker_count=0,
      prefetch=2,
  ))

  # What --mode=sample draws (and the PNG grid written every sample_every steps).
  c.sample = ml_collections.ConfigDict(dict(num=8, use_ema=True))
  # Evaluators (visgen_jax/eval), run every eval_every steps and by --mode=eval:
  # instance name -> {type: registered evaluator type, ...its settings}.
  c.evals = ml_collections.ConfigDict()
  return c


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads `path[:variant]` and applies `key=value` overrides."""
  path, _, variant = spec.partition(':')
  if not path.endswith('.py') or not os.path.isfile(path):
    raise UserError(f'--config: no config file at {path!r} (expected configs/<experiment>.py[:variant]).')
  module_spec = importlib.util.spec_from_file_location('visgen_experiment_config', path)
  module = importlib.util.module_from_spec(module_spec)
  folder = os.path.dirname(os.path.abspath(path))
  sys.path.insert(0, folder)  # for imports of the config files beside it
  try:
    module_spec.loader.exec_module(module)
  finally:
    sys.path.remove(folder)
  if not hasattr(module, 'get_config'):
    raise UserError(f'--config: {path} has no get_config(arg) function.')
  config = module.get_config(variant or None)
  for item in overrides:
    key, eq, value = item.partition('=')
    if not eq:
      raise UserError(f'--config.{key}: write overrides as --config.{key}=VALUE.')
    _override(config, key, value)
  config.lock()
  return config


def variant(config, arg, path: str, **variants):
  """`config` changed by the variant `arg` names: `variants` maps each name to a
  function that changes a config in place; arg None leaves it as it is.
  `path` is the config file's (its __file__), for the error."""
  if arg is None:
    return config
  if arg not in variants:
    raise UserError(f'--config={os.path.relpath(path)}:{arg}: unknown variant; allowed: '
                    f'{", ".join(variants)}, or none for the full config.')
  variants[arg](config)
  return config


def _override(config, dotted_key: str, text: str):
  *parents, leaf = dotted_key.split('.')
  node = config
  for i, name in enumerate(parents + [leaf]):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      where = '.'.join(parents[:i])
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(name, keys, n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ''
      raise UserError(f'--config.{dotted_key}: no key {name!r} in config'
                      f'{"." + where if where else ""}{hint}; allowed: {", ".join(sorted(keys))}.')
    if name != leaf or i < len(parents):
      node = node[name]
  old = node[leaf]
  node[leaf] = _parse_like(old, text, dotted_key)


def _parse_like(old, text: str, key: str):
  """Parses `text` as a value of the same type as `old`."""
  fail = lambda kind: UserError(f'--config.{key}={text}: expected {kind}.')
  if isinstance(old, ml_collections.ConfigDict):
    raise UserError(f'--config.{key}: is a group of keys ({", ".join(old.keys())}); set one of them.')
  if isinstance(old, bool):
    lowered = text.lower()
    if lowered in ('true', '1', 'yes'):
      return True
    if lowered in ('false', '0', 'no'):
      return False
    raise fail('true or false')
  if isinstance(old, int):
    try:
      return int(text)
    except ValueError:
      raise fail('an integer') from None
  if isinstance(old, float):
    try:
      return float(text)
    except ValueError:
      raise fail('a number') from None
  if isinstance(old, str):
    return text
  if isinstance(old, (tuple, list)):
    parts = [p.strip() for p in text.split(',') if p.strip()]
    kind = type(old[0]) if old else None
    try:
      return tuple(_parse_like(kind(), p, key) if kind in (int, float, str, bool) else _literal(p)
                   for p in parts)
    except UserError:
      raise fail(f'a comma-separated list of {kind.__name__}') from None
  return _literal(text)


def _literal(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


DTYPES = ('float32', 'bfloat16')


def validate(config):
  """Checks what a config file cannot check by itself; raises UserError."""
  def need(ok, key, allowed):
    if not ok:
      raise UserError(f'config.{key}={config_get(config, key)!r} is not allowed: {allowed}.')
  need(config.total_steps >= 0, 'total_steps', 'use a count >= 0')
  need(config.batch_size > 0, 'batch_size', 'use a positive global batch size')
  for key in ('log_every', 'ckpt_every'):
    need(config[key] > 0, key, 'use a positive step count')
  need(config.sample_every >= 0, 'sample_every', 'use 0 (never) or a positive step count')
  need(config.eval_every >= 0, 'eval_every', 'use 0 (never) or a positive step count')
  need(config.eval_every == 0 or config.evals, 'eval_every', 'config.evals is empty, so use 0')
  need(config.keep_checkpoints > 0, 'keep_checkpoints', 'keep at least 1')
  need(config.compute_dtype in DTYPES, 'compute_dtype', f'one of {", ".join(DTYPES)}')
  need(config.optimizer.name in ('adamw', 'adam', 'sgd'), 'optimizer.name', 'adamw, adam or sgd')
  need(config.optimizer.schedule in ('constant', 'linear', 'cosine'), 'optimizer.schedule', 'constant, linear or cosine')
  need(0.0 <= config.optimizer.ema_decay < 1.0, 'optimizer.ema_decay', 'a number in [0, 1)')
  need(set(config.mesh.keys()) == {'data', 'fsdp', 'model'}, 'mesh', 'exactly the axes data, fsdp, model')


def check_choice(config, key: str, allowed):
  """UserError unless config.<key> (dotted) is one of `allowed`."""
  value = config_get(config, key)
  if value not in allowed:
    raise UserError(f'config.{key}={value!r} is unknown; allowed: {", ".join(map(str, allowed))}.')


def config_get(config, dotted_key):
  node = config
  for name in dotted_key.split('.'):
    node = node[name]
  return node


# The resolved config a run writes into its workdir (the trainer): the run describes itself.
CONFIG_FILE = 'config.json'
# Top-level config keys that never change the shapes in a checkpoint.
RUN_SETTINGS = ('seed', 'total_steps', 'batch_size', 'log_every', 'ckpt_every', 'sample_every', 'eval_every',
                'keep_checkpoints', 'compute_dtype', 'mesh', 'sharding_rules', 'optimizer', 'sample',
                'sampler', 'evals', 'init_from', 'edit')


def _flat_config(config_dict, prefix=''):
  """{'model.channel_mult': [1, 2], ...} with JSON values (tuples as lists)."""
  out = {}
  for k, v in config_dict.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = json.loads(json.dumps(v))
  return out


def saved_config(workdir: str) -> dict | None:
  """The config (a dict) a run wrote into `workdir`, None when there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def changed_settings(config, workdir: str) -> list[str]:
  """'config.KEY=VALUE (the run has OLD)' for each config key whose value differs from the
  run's in workdir's config.json, model settings first (settings of the run, which never
  change the parameters' shapes, last); [] when the workdir has no config.json."""
  saved = saved_config(workdir)
  if saved is None:
    return []
  before = _flat_config(saved)
  now = _flat_config(config.to_dict())
  differing = sorted((k for k in set(before) | set(now) if before.get(k) != now.get(k)),
                     key=lambda k: (k.split('.')[0] in RUN_SETTINGS, k))
  return [f'config.{k}={now.get(k)!r} (the run has {before.get(k)!r})' for k in differing]
