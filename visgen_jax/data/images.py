"""Image sources: 'folder' (data.path, a dataset made by
data_prep/build_image_dataset.py) and the built-in 'sample' / 'sample_faces'
(data/sample_set.py, built on first use).

Records (data/folder.py): 'image' uint8 [H, W, 3], 'index' int64,
'file_name' bytes. Batches: 'image' float32 [b, H, W, 3] in [-1, 1], 'index'
int32 [b]. data keys: resolution (int or (H, W)), random_crop; 'folder' also
path. With random_crop, images stored larger than data.resolution are
cropped at a random place in training and at the centre in eval (the sample
set is then built 1/8 larger); otherwise the stored size must equal
data.resolution.
"""

import abc
import dataclasses

import numpy as np

from visgen_jax.data import folder
from visgen_jax.data import registry
from visgen_jax.data import sample_set
from visgen_jax.errors import UserError

BUILD_COMMAND = ('python data_prep/build_image_dataset.py --src=IMAGES '
                 '--out={out} --resolution=N')


@dataclasses.dataclass(frozen=True)
class ImageInfo(registry.SourceInfo):
  resolution: tuple[int, int]  # (H, W) as stored, before any random crop


def _resolution(data_config) -> tuple[int, int]:
  return folder.parse_resolution(data_config.resolution, 'data.resolution')


@dataclasses.dataclass(frozen=True)
class _Crop:
  """Crops to (H, W), at random or at the centre; drops the file name."""
  hw: tuple[int, int]
  random: bool

  def __call__(self, record, rng=None):
    image = record['image']
    h, w = self.hw
    if image.shape[:2] != (h, w):
      dh, dw = image.shape[0] - h, image.shape[1] - w
      if self.random:
        top, left = int(rng.integers(dh + 1)), int(rng.integers(dw + 1))
      else:
        top, left = dh // 2, dw // 2
      image = image[top:top + h, left:left + w]
    return {'image': image, 'index': np.int32(record['index'])}


def _to_float(batch):
  # Runs in the main process: workers ship uint8 (4x less to copy), and the
  # results are plain arrays rather than views of worker shared memory.
  image = batch['image'].astype(np.float32) * np.float32(1 / 127.5) - 1
  return {'image': image, 'index': np.array(batch['index'])}


class _Images(registry.Source):
  """An image dataset made by folder.py, at `dataset_dir(data_config)`."""
  keys = ('resolution', 'random_crop')

  @abc.abstractmethod
  def dataset_dir(self, data_config) -> str:
    """Where the dataset is (a built-in one is built on first use)."""

  def check(self, data_config):
    _resolution(data_config)

  def open(self, data_config):
    path = self.dataset_dir(data_config)
    if not folder.is_dataset_dir(path):
      raise UserError(f'data.path: no dataset at {path!r} (build one with: '
                      f'{BUILD_COMMAND.format(out=path)}).')
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder_from_directory(path)
    features = builder.info.features
    if (folder.SPLIT not in builder.info.splits
        or 'image' not in features or 'index' not in features
        or len(features['image'].shape) != 3 or features['image'].shape[2] != 3):
      raise UserError(f'data.path: {path!r} is not an image dataset made by '
                      'data_prep/build_image_dataset.py.')
    records = builder.as_data_source(folder.SPLIT)
    info = ImageInfo(name=self.name, path=path, num_examples=len(records),
                     resolution=tuple(features['image'].shape[:2]))
    return records, info

  def spec(self, data_config):
    h, w = _resolution(data_config)
    return {'image': registry.Feature((h, w, 3), np.float32, width_axis=1),
            'index': registry.Feature((), np.int32)}

  def transform(self, data_config, info, train):
    hw = _resolution(data_config)
    stored = info.resolution
    if stored != hw and not (data_config.get('random_crop', False)
                             and stored[0] >= hw[0] and stored[1] >= hw[1]):
      raise UserError(
          f'data.resolution: {hw} does not match the {stored} images in '
          f'{info.path!r}; rebuild the dataset at this resolution, or set '
          'data.random_crop=True to crop a smaller one.')
    return _Crop(hw, random=train)

  def finish(self, data_config, info):
    return _to_float


@registry.register('folder')
class FolderImages(_Images):
  """A dataset made by data_prep/build_image_dataset.py, at data.path."""
  keys = _Images.keys + ('path',)

  def check(self, data_config):
    super().check(data_config)
    self.dataset_dir(data_config)

  def dataset_dir(self, data_config):
    return registry.dataset_path(data_config, BUILD_COMMAND.format(out='DIR'))


@registry.register('sample')
@registry.register('sample_faces')
class SampleImages(_Images):
  """The built-in set of sample_set.py whose flavour is the source's name."""

  def dataset_dir(self, data_config):
    h, w = _resolution(data_config)
    if data_config.get('random_crop', False):
      h, w = h + h // 8, w + w // 8  # Room for the random crops.
    return sample_set.sample_dataset_dir(self.name, (h, w))
