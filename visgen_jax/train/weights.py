"""Which parameters train, and where a fresh run's weights come from.

`config.frozen`: regexes over '/'-joined parameter paths ('unet/input_blocks_0/...');
a parameter any of them matches (re.search) does not train: it gets no gradient,
no optimizer moments and no EMA copy, so a checkpoint holds it once.

`config.init_from`: sources applied, in order, to the initial parameters of a
fresh run (never on resume). Each is a path, or a dict
  {path, select='' (regex over the source's parameter paths after renaming; '' = all),
   rename=() (pattern, replacement): re.sub on the source's paths,
   use_ema=True (a workdir's EMA parameters, else its raw ones)}.
`path` is a workdir of this project (its latest checkpoint), a parameter
directory written by `python -m visgen_jax.convert`, or a foreign checkpoint
file read by the converter for its kind (visgen_jax.convert.read_foreign).
Every selected source parameter must exist in the new model with the same
shape; parameters no source provides keep their initial values.
"""

import os
import re

import jax
import numpy as np
import optax

from visgen_jax import convert

from visgen_jax.errors import UserError
from visgen_jax.train import checkpoint
from visgen_jax.train.sharding import path_name

SOURCE_KEYS = ('path', 'select', 'rename', 'use_ema')


def flatten(tree) -> dict:
  """{'/'-joined path: leaf}."""
  return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def trainable_mask(params, frozen_patterns):
  """A tree of bools like `params`: False where a `config.frozen` regex matches the path."""
  compiled = [re.compile(p) for p in frozen_patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(c.search(path_name(path)) for c in compiled), params)


def only(tree, mask):
  """`tree` with the leaves whose mask is False replaced by optax.MaskedNode (no leaves)."""
  return jax.tree.map(lambda x, m: x if m else optax.MaskedNode(), tree, mask)


def merge(partial, full):
  """`partial` (MaskedNode where absent) completed from `full`."""
  absent = lambda x: isinstance(x, optax.MaskedNode)
  return jax.tree.map(lambda p, f: f if absent(p) else p, partial, full, is_leaf=absent)


def check_frozen(frozen_patterns, params_shapes):
  """UserError unless every config.frozen regex compiles and matches some parameter,
  and something is left to train."""
  names = list(flatten(params_shapes))
  for pattern in frozen_patterns:
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise UserError(f'config.frozen: {pattern!r} is not a regular expression ({e}).') from None
    if not any(compiled.search(n) for n in names):
      raise UserError(f'config.frozen: {pattern!r} matches no parameter; parameters are named like '
                      f'{", ".join(names[:3])}.')
  if not any(jax.tree.leaves(trainable_mask(params_shapes, frozen_patterns))):
    raise UserError(f'config.frozen={tuple(frozen_patterns)} freezes every parameter; nothing would train.')


def check_lr_multipliers(multipliers, params_shapes):
  """UserError unless config.optimizer.lr_multipliers is (regex, positive factor) pairs, each
  regex matching some parameter."""
  names = list(flatten(params_shapes))
  for entry in multipliers:
    where = f'config.optimizer.lr_multipliers entry {tuple(entry) if isinstance(entry, (list, tuple)) else entry!r}'
    if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str)
        or isinstance(entry[1], bool) or not isinstance(entry[1], (int, float)) or entry[1] <= 0):
      raise UserError(f'{where}: give (regex over parameter paths, factor > 0) pairs, e.g. '
                      "(('^backbone/', 0.1),).")
    try:
      compiled = re.compile(entry[0])
    except re.error as e:
      raise UserError(f'{where}: {entry[0]!r} is not a regular expression ({e}).') from None
    if not any(compiled.search(n) for n in names):
      raise UserError(f'{where}: {entry[0]!r} matches no parameter; parameters are named like '
                      f'{", ".join(names[:3])}.')


def sources(init_from) -> list[dict]:
  """config.init_from as a list of complete source dicts; UserError on a malformed entry."""
  out = []
  for i, entry in enumerate(init_from):
    where = f'config.init_from[{i}]'
    entry = {'path': entry} if isinstance(entry, str) else dict(entry)
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
      raise UserError(f'{where} has keys {", ".join(unknown)}; allowed: {", ".join(SOURCE_KEYS)}.')
    source = {'select': '', 'rename': (), 'use_ema': True, **entry}
    path = os.path.abspath(os.path.expanduser(str(source.get('path', ''))))
    if not source.get('path') or not os.path.exists(path):
      raise UserError(f'{where}.path={source.get("path", "")!r}: no such workdir, parameter directory or '
                      'checkpoint file.')
    rename = tuple(source['rename'])
    if rename and len(rename) != 2:
      raise UserError(f'{where}.rename={rename!r}: give (pattern, replacement).')
    try:
      re.compile(source['select'])
      if rename:
        re.compile(rename[0])
    except re.error as e:
      raise UserError(f'{where}: a select or rename pattern is not a regular expression ({e}).') from None
    out.append(dict(source, path=path, rename=rename, where=where))
  return out


def read_source(source, config) -> dict:
  """{parameter path: numpy array} of one init_from source, before select and rename."""
  path = source['path']
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    state = checkpoint.restore_latest_state(os.path.join(path, 'checkpoints'))
    if state is None:
      raise UserError(f'{source["where"]}.path={path!r} is a workdir without a finished checkpoint.')
    params = flatten(state['params'])
    if source['use_ema']:
      # A restored EMA tree lacks the subtrees that had no copy (frozen, model state): merge by name.
      params.update(flatten(state['ema_params']))
  elif os.path.isdir(path):
    params = checkpoint.restore_params_dir(path)
  else:
    params = convert.read_foreign(path, config)
  return {name: np.asarray(leaf) for name, leaf in flatten(params).items()}


def _listed(names, limit: int = 4) -> str:
  names = sorted(names)
  return ', '.join(names[:limit]) + (f' and {len(names) - limit} more' if len(names) > limit else '')


def initial_weights(init_from, config, params_shapes) -> dict:
  """{parameter path: numpy array} that config.init_from puts into a fresh run,
  checked against `params_shapes` (the new model's). Later sources win."""
  target = {n: tuple(s.shape) for n, s in flatten(params_shapes).items()}
  loaded = {}
  for source in sources(init_from):
    selected = {}
    select = re.compile(source['select'])
    for name, array in read_source(source, config).items():
      if source['rename']:
        name = re.sub(source['rename'][0], source['rename'][1], name)
      if select.search(name):
        selected[name] = array
    where = f'{source["where"]} ({source["path"]})'
    if not selected:
      raise UserError(f'{where} selects no parameter; check its select and rename patterns.')
    missing = [n for n in selected if n not in target]
    if missing:
      raise UserError(f'{where}: {len(missing)} selected parameters do not exist in this model '
                      f'({_listed(missing)}); narrow select or fix rename.')
    wrong = [f'{n} {selected[n].shape} vs {target[n]}' for n in selected if selected[n].shape != target[n]]
    if wrong:
      raise UserError(f'{where}: {len(wrong)} parameters have another shape than in this model '
                      f'({_listed(wrong, 2)}); exclude them with select.')
    loaded.update(selected)
  return loaded
