"""The built-in sample set: photographs that ship inside scikit-image.

With no dataset configured, experiments train on this, so that every config
runs offline on a fresh machine. Two flavours:

  'sample'        14 photographs (astronaut, coffee, chelsea, rocket, ...) and
                  the 100 face crops of `skimage.data.lfw_subset` (114 images)
  'sample_faces'  the 100 lfw faces only, for face configs

The 25x25 faces are upscaled, so this is a set for smoke tests and first runs,
not for quality. On first use a flavour is built with the folder builder
(`visgen_jax.data.folder`) into `$VISGEN_CACHE/datasets/` (default
`~/.cache/visgen_jax/datasets/`), one directory per resolution and crop, and
reused afterwards. Processes that build it at the same time each write a
private copy and rename it into place; the first rename wins.
"""

import os
import shutil
import tempfile

from absl import logging
import numpy as np
from PIL import Image

from visgen_jax.data import folder
from visgen_jax.errors import UserError

FLAVOURS = ('sample', 'sample_faces')
# Photographs (no synthetic images) that load without a download.
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field',
          'immunohistochemistry', 'retina', 'camera', 'coins', 'brick',
          'grass', 'gravel', 'moon', 'clock')
NUM_FACES = 100  # lfw_subset holds 100 faces, then 100 non-face patches.
# Bump when the image list changes so that old caches are not reused.
_VERSION = 1


def cache_dir() -> str:
  """Root of visgen_jax's caches: $VISGEN_CACHE or ~/.cache/visgen_jax."""
  return os.environ.get('VISGEN_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'visgen_jax')


def sample_images(flavour: str) -> list[tuple[str, np.ndarray]]:
  """(file name, uint8 image) pairs of a flavour, gray images kept gray."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  if flavour not in FLAVOURS:
    raise UserError(f'data.name: {flavour!r} is not a sample set; use one of '
                    f'{", ".join(FLAVOURS)}.')
  images = []
  if flavour == 'sample':
    images += [(f'{name}.png', getattr(skimage.data, name)())
               for name in PHOTOS]
  faces = skimage.data.lfw_subset()[:NUM_FACES]
  images += [(f'lfw_{i:03d}.png', np.round(face * 255).astype(np.uint8))
             for i, face in enumerate(faces)]
  return images


def sample_dataset_dir(flavour: str, resolution, crop: str = 'center') -> str:
  """Directory of the built sample dataset, building it on first use."""
  h, w = folder.parse_resolution(resolution, 'data.resolution')
  root = os.path.join(cache_dir(), 'datasets')
  out = os.path.join(root, f'{flavour}-v{_VERSION}-{h}x{w}-{crop}')
  if folder.is_dataset_dir(out):
    return out
  images = sample_images(flavour)
  os.makedirs(root, exist_ok=True)
  src = tempfile.mkdtemp(prefix=f'.{flavour}-src-', dir=root)
  try:
    for name, image in images:
      Image.fromarray(image).save(os.path.join(src, name), compress_level=1)
    report = folder.build_image_dataset(src, out, (h, w), crop=crop, seed=0,
                                        exist_ok=True)
  finally:
    shutil.rmtree(src, ignore_errors=True)
  logging.info('Sample set %r: %d images in %s', flavour, report.num_examples,
               out)
  return out
