"""Evaluators: a registry of evaluator types, and the instances a config lists in config.evals.

An instance is `config.evals.<name> = {type: <registered type>, ...its settings}`, e.g.

  c.evals.seg = ml_collections.ConfigDict(dict(type='segmentation', path='', max_images=0))

A type is a function registered with `@register(type, **default settings)`:

  build(config, settings, system, where) -> evaluate(params, step) -> {metric: number}

`build` runs before anything is written and checks the settings (UserErrors name `where`.<key>,
e.g. config.evals.seg.max_images). `evaluate` works on this process's shard of its data
(examples process_index, process_index + process_count, ...) and returns the results reduced
over processes (`merge_over_processes`), the same on every process. The trainer runs every
instance every config.eval_every steps and for --mode=eval; result keys are prefixed with the
instance name ('seg/semantic/miou').

A type lives in a module of this package; every module here is imported when evaluators are
built, so a new type is one new file.
"""

import importlib
import pickle
import pkgutil

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from visgen_jax.errors import UserError

_TYPES = {}  # type name -> (build, default settings)


def register(name: str, **defaults):
  """Decorator: `build` is the evaluator type `name`; `defaults` are all its settings."""
  def add(build):
    if name in _TYPES:
      raise ValueError(f'evaluator type {name!r} is registered twice.')
    _TYPES[name] = (build, defaults)
    return build
  return add


def registered_types() -> list[str]:
  """The type names, after importing every module of this package (each registers its own)."""
  for module in pkgutil.iter_modules(__path__):
    importlib.import_module(f'{__name__}.{module.name}')
  return sorted(_TYPES)


def build_evaluators(config, system) -> dict:
  """{instance name: evaluate(params, step) -> {'<instance>/<metric>': float}} for config.evals."""
  types = registered_types()
  evaluators = {}
  for name, settings in config.evals.items():
    where = f'config.evals.{name}'
    if not isinstance(settings, ml_collections.ConfigDict):
      raise UserError(f'{where}={settings!r} must be a group of settings: {{type, ...}}.')
    if settings.get('type') not in _TYPES:
      raise UserError(f'{where}.type={settings.get("type")!r} is not an evaluator type; allowed: '
                      f'{", ".join(types)}.')
    build, defaults = _TYPES[settings.type]
    given = {k: v for k, v in settings.items() if k != 'type'}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
      raise UserError(f'{where}.{unknown[0]} is not a setting of evaluator type {settings.type!r}; '
                      f'allowed: {", ".join(["type", *defaults])}.')
    evaluate = build(config, ml_collections.ConfigDict({**defaults, **given}), system, where)
    evaluators[name] = _prefixed(name, evaluate)
  return evaluators


def _prefixed(name, evaluate):
  return lambda params, step: {f'{name}/{k}': float(v) for k, v in evaluate(params, step).items()}


def process_local(params):
  """`params` whole on this process's first device, also when they are split over processes: for
  running a model on this process's shard of the data alone."""
  return jax.device_put(multihost_utils.process_allgather(params, tiled=True), jax.local_devices()[0])


def merge_over_processes(accumulator):
  """Every process's `accumulator` merged, in process order, into the first (with its
  `merge(other)`): the same result on every process. Accumulators travel pickled, so any state
  (counts, float sums, lists of detections) arrives exactly."""
  data = np.frombuffer(pickle.dumps(accumulator), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(data.size)).reshape(-1)
  padded = np.zeros(sizes.max(), np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  first, *others = [pickle.loads(row[:size].tobytes()) for row, size in zip(rows, sizes)]
  for other in others:
    first.merge(other)
  return first
