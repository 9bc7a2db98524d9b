"""Input pipeline: one grain builder for every registered data source.

  source, info = make_dataset_source(config.data)
  it = make_train_iterator(config.data, local_batch_size=global_batch //
                           jax.process_count(), seed=config.seed,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
  batch = next(it)   # e.g. {'image': float32 [b, H, W, 3] in [-1, 1], 'index': int32 [b]}
  state = it.get_state()   # JSON-able dict; it.set_state(state) resumes exactly
  example_batch(config.data, b)   # zeros of a batch's shapes, for init

`config.data.name` selects a source of visgen_jax.data.registry (which
describes them, and the keys each reads); each function here first checks
config.data with `registry.validate`. Every source also reads random_flip,
worker_count and prefetch.

The training stream is one global order (reshuffled every epoch, repeated
forever); each process reads only its slice of every global batch. Batches
depend only on the seed and the global batch size, not on the number of
processes, timing, threads or worker processes. With data.random_flip, each
training example is mirrored left-right with probability 1/2 after the
source's transform: all of its spatial keys together (registry.Feature).
With worker_count > 0 the script needs an `if __name__ == '__main__':` guard.
"""

import dataclasses
import json
from collections.abc import Callable

import grain
import numpy as np

from visgen_jax.data import registry
from visgen_jax.errors import UserError


def make_dataset_source(data_config):
  """Returns (random-access records, info) of the source config.data names."""
  return registry.validate(data_config).open(data_config)


def _mirror(array, axis: int, width: int, sign) -> np.ndarray:
  """`array` flipped along `axis` within its first `width` positions, whose
  last axis is then multiplied by `sign` (None: unchanged)."""
  content = [slice(None)] * array.ndim
  content[axis] = slice(None, width)
  content = tuple(content)
  mirrored = np.flip(array[content], axis)
  if sign is not None:
    mirrored = mirrored * np.asarray(sign, array.dtype)
  if width == array.shape[axis]:
    return mirrored
  out = array.copy()
  out[content] = mirrored
  return out


@dataclasses.dataclass(frozen=True)
class _Example:
  """A source's transform, then maybe a left-right flip of the spatial keys."""
  transform: Callable
  # (key, width axis, flip sign) of the keys to flip; () = no flips.
  flipped: tuple[tuple[str, int, tuple | None], ...]

  def __call__(self, record, rng=None):
    example = self.transform(record, rng)
    if self.flipped and rng.random() < 0.5:
      valid_hw = example.get('valid_hw')
      for key, axis, sign in self.flipped:
        # Keys a source makes only in `finish` (from flipped ones) are absent.
        if key in example:
          array = example[key]
          width = array.shape[axis] if valid_hw is None else int(valid_hw[1])
          example[key] = _mirror(array, axis, width, sign)
    return example


def _spatial(spec) -> tuple:
  """(key, width axis, flip sign) of the spatial features of `spec`."""
  return tuple((key, f.width_axis, f.flip_sign) for key, f in spec.items()
               if f.width_axis is not None)


@dataclasses.dataclass(frozen=True)
class _Finish:
  """A source's batch step in the main process, checked against its spec."""
  finish: Callable
  spec: dict
  source: str

  def __call__(self, batch):
    batch = self.finish(batch)
    got = {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
    want = {k: (f.shape, np.dtype(f.dtype)) for k, f in self.spec.items()}
    if got != want:
      raise ValueError(f'data source {self.source!r} made a batch of {got}, '
                       f'but its spec says {want}.')
    return batch


class DataIterator:
  """Iterator over batches whose position can be saved and restored.

  `get_state()` returns a JSON-able dict; `set_state` on an iterator made with
  the same data config, seed, batch size, process count and worker count
  (grain's state layout depends on it) resumes exactly where the saved one
  stopped. Processes advance in lockstep, so the state is the same on all of
  them and saving process 0's copy is enough. Call `close()` (or use `with`)
  to stop worker processes early.
  """

  def __init__(self, dataset: grain.IterDataset, settings: dict):
    self._iterator = iter(dataset)
    # JSON round trip so that a restored state compares equal.
    self._settings = json.loads(json.dumps(settings))

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iterator)

  def get_state(self) -> dict:
    return {'settings': self._settings,
            'grain': self._iterator.get_state()}

  def set_state(self, state: dict) -> None:
    if state.get('settings') != self._settings:
      raise UserError('data iterator: the saved state was made with '
                      f'{state.get("settings")}, but this run uses '
                      f'{self._settings}; resume with the same data settings.')
    self._iterator.set_state(state['grain'])

  def close(self) -> None:
    """Stops prefetch threads and worker processes."""
    self._iterator.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _check_layout(info, local_batch_size, process_index, process_count):
  if local_batch_size <= 0:
    raise UserError(f'batch size: the local batch size is {local_batch_size}; '
                    'the global batch size must be a positive multiple of '
                    'the number of processes.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in '
                     f'[0, {process_count}).')
  if info.num_examples < process_count:
    raise UserError(f'data.path: {info.path!r} holds {info.num_examples} '
                    f'examples, fewer than the {process_count} processes.')


def _settings(data_config, source, info, **extra) -> dict:
  """What the saved position is only valid for."""
  # Not data.path: a dataset may move between runs (num_examples stays).
  read = {key: data_config.get(key) for key in source.keys if key != 'path'}
  return {'source': source.name, 'num_examples': info.num_examples,
          'data': read, 'worker_count': int(data_config.get('worker_count', 0)),
          **extra}


def _iter_dataset(ds: grain.MapDataset, data_config,
                  finish: _Finish) -> grain.IterDataset:
  """Reads `ds` in threads or worker processes; `finish` maps each batch."""
  prefetch = int(data_config.get('prefetch', 2))
  workers = int(data_config.get('worker_count', 0))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=min(prefetch, 16),
                                            prefetch_buffer_size=prefetch))
  if workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    # grain's worker processes read absl flags; outside an absl app nothing
    # parsed them, so accept the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds.map(finish)


def _seed32(*entropy: int) -> int:
  return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def make_train_iterator(data_config, *, local_batch_size: int, seed: int,
                        process_index: int = 0,
                        process_count: int = 1) -> DataIterator:
  """Infinite shuffled, augmented batches of this process's shard."""
  source = registry.validate(data_config)
  records, info = source.open(data_config)
  _check_layout(info, local_batch_size, process_index, process_count)
  spec = source.spec(data_config)
  flip = bool(data_config.get('random_flip', False))
  example = _Example(source.transform(data_config, info, train=True),
                     _spatial(spec) if flip else ())
  # One global stream of shuffled (per epoch), augmented examples; global batch k
  # is its elements [k*B, (k+1)*B) and process p reads only its p-th slice of b.
  # So batches, augmentations and the saved position are the same whether 1 or
  # N processes read them.
  ds = grain.MapDataset.source(records).shuffle(seed=_seed32(seed, 0)).repeat()
  ds = ds.random_map(example, seed=_seed32(seed, 1))
  ds = ds.batch(local_batch_size)[process_index::process_count]
  finish = _Finish(source.finish(data_config, info), spec, source.name)
  settings = _settings(data_config, source, info, kind='train', seed=seed,
                       random_flip=flip,
                       global_batch_size=local_batch_size * process_count)
  return DataIterator(_iter_dataset(ds, data_config, finish), settings)


def make_eval_iterator(data_config, *, local_batch_size: int,
                       process_index: int = 0,
                       process_count: int = 1) -> DataIterator:
  """One pass over this process's shard in dataset order, no augmentation.

  This process reads records p, p + P, ...; the last batch may be smaller.
  """
  source = registry.validate(data_config)
  records, info = source.open(data_config)
  _check_layout(info, local_batch_size, process_index, process_count)
  transform = source.transform(data_config, info, train=False)
  ds = grain.MapDataset.source(records)[process_index::process_count]
  ds = ds.map(_Example(transform, flipped=()))
  ds = ds.batch(local_batch_size, drop_remainder=False)
  finish = _Finish(source.finish(data_config, info),
                   source.spec(data_config), source.name)
  settings = _settings(data_config, source, info, kind='eval',
                       local_batch_size=local_batch_size,
                       process_count=process_count)
  return DataIterator(_iter_dataset(ds, data_config, finish), settings)


def example_batch(data_config, batch_size: int) -> dict:
  """Zeros shaped and typed like a batch of `batch_size`, reading no data."""
  spec = registry.validate(data_config).spec(data_config)
  return {key: np.zeros((batch_size, *f.shape), f.dtype)
          for key, f in spec.items()}


class ExampleIterator:
  """`example_batch` forever, for a loss that reads no batch; a DataIterator without data
  (its saved position is only what it stands for)."""

  def __init__(self, data_config, batch_size: int):
    self._batch = example_batch(data_config, batch_size)

  def __iter__(self):
    return self

  def __next__(self):
    return self._batch

  def get_state(self) -> dict:
    return {'settings': {'reads': 'no data'}}

  def set_state(self, state: dict) -> None:
    if state != self.get_state():
      raise UserError(f'data iterator: the saved state {state} was made by a run that read data, '
                      'this one reads none; resume with the same config.')
