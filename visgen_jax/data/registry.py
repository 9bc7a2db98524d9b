"""Data sources by name (what `config.data.name` selects); checks config.data.

A source is a `Source` subclass registered with `@register(name)` (one
instance per name, which knows its name). It says

  keys                      the config.data keys it reads besides COMMON_KEYS
  check(data_config)        config-only checks, reading no data
  open(data_config)         (records, info): records with len() and [i], and a
                            `SourceInfo` (name, path, num_examples, ...)
  spec(data_config)         {key: Feature}: one example of a batch; the
                            pipeline's `example_batch` is zeros of it and every
                            batch is checked against it
  transform(data_config, info, train)   f(record, rng) -> example, run in
                            grain's threads or worker processes (so it must
                            pickle); rng is a numpy Generator in training,
                            None in eval
  finish(data_config, info) f(batch) -> batch, run in the main process

`visgen_jax.data.pipeline` builds every iterator from these, and mirrors
examples for data.random_flip itself (see Feature). Built-in sources:
sample, sample_faces, folder (data/images.py), seg_sample, segmentation
(data/segmentation/source.py); importing `visgen_jax.data` registers them.

Settings a source does not read: every source reads COMMON_KEYS. Any other key
of config.data that the selected source does not list in `keys` must be unset
('', 0, False, None or an empty list), because nothing would read it:
`validate` refuses e.g. data.path with data.name=sample_faces and names the
sources that read data.path.
"""

import abc
import dataclasses
import os
from collections.abc import Callable, Sequence

from visgen_jax.errors import UserError

# Read by the pipeline for every source.
COMMON_KEYS = ('name', 'random_flip', 'worker_count', 'prefetch')


@dataclasses.dataclass(frozen=True)
class Feature:
  """One key of the examples in a batch.

  A feature with a width axis is spatial: data.random_flip mirrors it along
  that axis, together with every other spatial key of the example. If the
  example holds 'valid_hw' = (h, w), its arrays are padded at the bottom /
  right around content in the top-left h x w, and only the content is
  mirrored. `flip_sign` multiplies the last axis after a flip, for channels
  whose sign changes (surface normals: (-1, 1, 1), x points the other way).
  """
  shape: tuple[int, ...]  # one example's, without the batch axis
  dtype: type
  width_axis: int | None = None
  flip_sign: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What `Source.open` found; sources extend it with their own fields."""
  name: str
  path: str
  num_examples: int


class Source(abc.ABC):
  """A kind of dataset; see the module docstring. Subclasses use `register`."""
  keys: tuple[str, ...] = ()

  def __init__(self, name: str):
    self.name = name

  def check(self, data_config) -> None:
    """Raises UserError for a config.data this source cannot use."""

  @abc.abstractmethod
  def open(self, data_config) -> tuple[Sequence, SourceInfo]:
    """(records, info); may build a built-in dataset on first use."""

  @abc.abstractmethod
  def spec(self, data_config) -> dict[str, Feature]:
    """One example of a batch, key by key."""

  @abc.abstractmethod
  def transform(self, data_config, info, train: bool) -> Callable:
    """f(record, rng) -> example; rng is None in eval."""

  @abc.abstractmethod
  def finish(self, data_config, info) -> Callable:
    """f(batch) -> batch, in the main process."""


_SOURCES: dict[str, Source] = {}


def register(name: str):
  """Class decorator: `data.name=name` selects an instance of the class."""
  def decorate(cls):
    if name in _SOURCES:
      raise ValueError(f'data source {name!r} is registered twice.')
    _SOURCES[name] = cls(name)
    return cls
  return decorate


def names() -> list[str]:
  return sorted(_SOURCES)


def _unset(value) -> bool:
  return value is None or (isinstance(value, (str, int, float, tuple, list))
                           and not value)


def validate(data_config) -> Source:
  """Checks config.data against its source (reading no data); returns it."""
  source = _SOURCES.get(data_config.name)
  if source is None:
    raise UserError(f'data.name: {data_config.name!r} is unknown; the '
                    f'registered sources are {", ".join(names())}.')
  for key, value in data_config.items():
    if key in COMMON_KEYS or key in source.keys or _unset(value):
      continue
    readers = [n for n in names() if key in _SOURCES[n].keys]
    needs = (f'needs data.name={" or ".join(readers)}' if readers
             else 'is read by no data source')
    raise UserError(f'data.{key}={value!r} {needs}, but data.name is '
                    f'{source.name!r}; unset it or change data.name.')
  source.check(data_config)
  return source


def dataset_path(data_config, build_command: str) -> str:
  """data.path as an absolute path; `build_command` makes one (for errors)."""
  path = data_config.get('path', '')
  if not path:
    raise UserError(f'data.path: empty; set it to a dataset directory (build '
                    f'one with: {build_command}).')
  return os.path.abspath(os.path.expanduser(path))
