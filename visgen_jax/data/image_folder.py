"""Source 'image_folder': a small folder of images read directly, no dataset build.

For albums (Gen2Res fine-tunes on ~16-20 photos): the folder is the dataset, so
a personal album is just a folder and a generative album is used where it was
written. Every image (jpg/png/webp, also in sub-folders; hidden files left out)
is decoded once when the source opens and kept in memory, and must already be
data.resolution: an album is aligned and sized for the model beforehand, and a
silent resize would change what the model is fine-tuned on. For large image
sets build an ArrayRecord dataset instead (data.name=folder).

Batches are those of 'folder': 'image' float32 [b, H, W, 3] in [-1, 1], 'index' int32 [b].
"""

import os

import numpy as np

from visgen_jax import image_io
from visgen_jax.data import folder
from visgen_jax.data import images
from visgen_jax.data import registry
from visgen_jax.errors import UserError


def read_folder(path: str, hw: tuple[int, int], where: str = 'data.path') -> list[np.ndarray]:
  """The images under `path` as uint8 [H, W, 3], sorted by name; UserError naming `where` for a
  missing or empty folder, an unreadable image or one of another size than `hw`."""
  if not os.path.isdir(path):
    raise UserError(f'{where}={path!r}: no such folder of images.')
  names, _ = folder.list_images(path)
  if not names:
    raise UserError(f'{where}={path!r} holds no {"/".join(e[1:] for e in folder.IMAGE_EXTENSIONS)} images.')
  arrays = []
  for name in names:
    image = image_io.read_rgb(os.path.join(path, name), where)
    if image.shape[:2] != tuple(hw):
      raise UserError(f'{where}={path!r}: {name} is {image.shape[0]}x{image.shape[1]}, but the model needs '
                      f'{hw[0]}x{hw[1]} images (data.resolution).')
    arrays.append(image)
  return arrays


@registry.register('image_folder')
class ImageFolder(images.FolderImages):
  """data.path: a folder of images of exactly data.resolution."""
  keys = ('resolution', 'path')

  def check(self, data_config):
    # data.path may still be empty: a Gen2Res run fills it with the album it makes.
    folder.parse_resolution(data_config.resolution, 'data.resolution')

  def open(self, data_config):
    path = registry.dataset_path(data_config, 'a folder of images')
    hw = folder.parse_resolution(data_config.resolution, 'data.resolution')
    records = [{'image': image, 'index': i} for i, image in enumerate(read_folder(path, hw))]
    return records, images.ImageInfo(name=self.name, path=path, num_examples=len(records), resolution=hw)
