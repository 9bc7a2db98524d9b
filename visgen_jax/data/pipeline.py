"""Input pipeline: grain over the ArrayRecord datasets made by data_prep.

  source, info = make_dataset_source(config.data)
  it = make_train_iterator(config.data, local_batch_size=global_batch //
                           jax.process_count(), seed=config.seed,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
  batch = next(it)   # {'image': float32 [b, H, W, 3] in [-1, 1], 'index': int32 [b]}
  state = it.get_state()   # JSON-able dict; it.set_state(state) resumes exactly
  example_batch(config.data, b)   # zeros of a batch's shapes, for init

`data_config` keys: name ('sample' | 'sample_faces' | 'folder'), path (the
dataset directory for 'folder'), resolution (int or (H, W)), random_flip,
random_crop, worker_count, prefetch.

The training stream is one global order (reshuffled every epoch, repeated
forever); each process reads only its slice of every global batch. Batches
depend only on the seed and the global batch size, not on the number of
processes, timing, threads or worker processes. With random_crop, images stored larger
than data.resolution are cropped at a random place (the sample set is then
built 1/8 larger); otherwise the stored size must equal data.resolution.
With worker_count > 0 the script needs an `if __name__ == '__main__':` guard.
"""

import dataclasses
import json
import os

import grain
import numpy as np

from visgen_jax.data import folder
from visgen_jax.data import sample_set
from visgen_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What `make_dataset_source` found."""
  name: str
  path: str
  num_examples: int
  resolution: tuple[int, int]  # (H, W) as stored, before any random crop


def _train_resolution(data_config) -> tuple[int, int]:
  return folder.parse_resolution(data_config.resolution, 'data.resolution')


def make_dataset_source(data_config):
  """Returns (random-access source of examples, SourceInfo).

  Examples are dicts with 'image' uint8 [H, W, 3], 'index' int64 and
  'file_name' bytes.
  """
  name = data_config.name
  if name in sample_set.FLAVOURS:
    h, w = _train_resolution(data_config)
    if data_config.get('random_crop', False):
      h, w = h + h // 8, w + w // 8  # Room for the random crops.
    path = sample_set.sample_dataset_dir(name, (h, w))
  elif name == 'folder':
    path = data_config.get('path', '')
    if not path:
      raise UserError("data.path: empty; set it to a dataset directory (build "
                      "one with: python data_prep/build_image_dataset.py "
                      "--src=IMAGES --out=DIR --resolution=N).")
    path = os.path.abspath(os.path.expanduser(path))
  else:
    raise UserError(f'data.name: {name!r} is unknown; use sample, '
                    'sample_faces or folder (with data.path).')
  if not folder.is_dataset_dir(path):
    raise UserError(f'data.path: no dataset at {path!r} (build one with: '
                    'python data_prep/build_image_dataset.py --src=IMAGES '
                    f'--out={path} --resolution=N).')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(path)
  features = builder.info.features
  if (folder.SPLIT not in builder.info.splits
      or 'image' not in features or 'index' not in features
      or len(features['image'].shape) != 3 or features['image'].shape[2] != 3):
    raise UserError(f'data.path: {path!r} is not an image dataset made by '
                    'data_prep/build_image_dataset.py.')
  source = builder.as_data_source(folder.SPLIT)
  info = SourceInfo(name=name, path=path, num_examples=len(source),
                    resolution=tuple(features['image'].shape[:2]))
  return source, info


@dataclasses.dataclass(frozen=True)
class _Crop:
  """Crops uint8 images to (H, W), at random or at the centre."""
  hw: tuple[int, int]
  random: bool

  def __call__(self, image, rng):
    h, w = self.hw
    if image.shape[:2] == (h, w):
      return image
    dh, dw = image.shape[0] - h, image.shape[1] - w
    if self.random:
      top, left = int(rng.integers(dh + 1)), int(rng.integers(dw + 1))
    else:
      top, left = dh // 2, dw // 2
    return image[top:top + h, left:left + w]


@dataclasses.dataclass(frozen=True)
class _Augment:
  """Crop, maybe flip, drop the file name (a grain map or random map)."""
  crop: _Crop
  flip: bool

  def __call__(self, example, rng=None):
    image = self.crop(example['image'], rng)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return {'image': image, 'index': np.int32(example['index'])}


def _to_float(batch):
  # Runs in the main process: workers ship uint8 (4x less to copy), and the
  # results are plain arrays rather than views of worker shared memory.
  image = batch['image'].astype(np.float32) * np.float32(1 / 127.5) - 1
  return {'image': image, 'index': np.array(batch['index'])}


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
                    f'images, fewer than the {process_count} processes.')


def _crop_for(data_config, info, *, random: bool) -> _Crop:
  hw = _train_resolution(data_config)
  stored = info.resolution
  if stored != hw and not (data_config.get('random_crop', False)
                           and stored[0] >= hw[0] and stored[1] >= hw[1]):
    raise UserError(
        f'data.resolution: {hw} does not match the {stored} images in '
        f'{info.path!r}; rebuild the dataset at this resolution, or set '
        'data.random_crop=True to crop a smaller one.')
  return _Crop(hw, random)


def _iter_dataset(ds: grain.MapDataset, data_config,
                  finish=_to_float) -> grain.IterDataset:
  """Reads `ds` in threads or worker processes; `finish` maps each batch.

  `finish` runs in the main process; segmentation.py passes its own.
  """
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


# Dataset names whose records are segmentation examples (visgen_jax.data.segmentation).
SEGMENTATION_DATASETS = ('seg_sample', 'segmentation')


def _segmentation():
  # Imported on use: the segmentation reader is built on this module's machinery.
  from visgen_jax.data import segmentation  # pylint: disable=g-import-not-at-top
  return segmentation


def make_train_iterator(data_config, *, local_batch_size: int, seed: int,
                        process_index: int = 0,
                        process_count: int = 1) -> DataIterator:
  """Infinite shuffled, augmented batches of this process's shard."""
  if data_config.name in SEGMENTATION_DATASETS:
    return _segmentation().make_segmentation_iterator(
        data_config, local_batch_size=local_batch_size, seed=seed, train=True,
        process_index=process_index, process_count=process_count)
  source, info = make_dataset_source(data_config)
  _check_layout(info, local_batch_size, process_index, process_count)
  augment = _Augment(_crop_for(data_config, info, random=True),
                     bool(data_config.get('random_flip', False)))
  # One global stream of shuffled (per epoch), augmented examples; global batch k
  # is its elements [k*B, (k+1)*B) and process p reads only its p-th slice of b.
  # So batches, augmentations and the saved position are the same whether 1 or
  # N processes read them.
  ds = grain.MapDataset.source(source).shuffle(seed=_seed32(seed, 0)).repeat()
  ds = ds.random_map(augment, seed=_seed32(seed, 1))
  ds = ds.batch(local_batch_size)[process_index::process_count]
  settings = {'kind': 'train', 'seed': seed, 'num_examples': info.num_examples,
              'resolution': augment.crop.hw, 'random_flip': augment.flip,
              'global_batch_size': local_batch_size * process_count,
              'worker_count': int(data_config.get('worker_count', 0))}
  return DataIterator(_iter_dataset(ds, data_config), settings)


def make_eval_iterator(data_config, *, local_batch_size: int,
                       process_index: int = 0,
                       process_count: int = 1) -> DataIterator:
  """One pass over this process's shard in dataset order, no augmentation.

  Images are centre-cropped if stored larger; the last batch may be smaller.
  """
  source, info = make_dataset_source(data_config)
  _check_layout(info, local_batch_size, process_index, process_count)
  crop = _crop_for(data_config, info, random=False)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.map(_Augment(crop, flip=False))
  ds = ds.batch(local_batch_size, drop_remainder=False)
  settings = {'kind': 'eval', 'num_examples': info.num_examples,
              'resolution': crop.hw, 'local_batch_size': local_batch_size,
              'process_count': process_count,
              'worker_count': int(data_config.get('worker_count', 0))}
  return DataIterator(_iter_dataset(ds, data_config), settings)


def example_batch(data_config, batch_size: int) -> dict:
  """Zeros shaped and typed like a batch of `batch_size`, reading no data."""
  if data_config.name in SEGMENTATION_DATASETS:
    return _segmentation().example_segmentation_batch(data_config, batch_size)
  h, w = _train_resolution(data_config)
  return {'image': np.zeros((batch_size, h, w, 3), np.float32),
          'index': np.zeros((batch_size,), np.int32)}
