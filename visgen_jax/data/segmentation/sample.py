"""The built-in segmentation sample set ('seg_sample').

64 synthetic 96 x 128 images made from a fixed seed, no download: a sky over
grass, water or sand (textured stuff) and one to three circles, squares and
triangles (things, each one segment, possibly overlapping). Categories:
circle, square, triangle (things), sky, grass, water, sand (stuff). Built on
first use into `$VISGEN_CACHE/datasets/` like the image sample sets.
"""

import functools
import io
import os

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageDraw

from visgen_jax.data import folder
from visgen_jax.data import sample_set
from visgen_jax.data.segmentation import writer

SAMPLE_NAME = 'seg_sample'
# Bump when the synthetic images change so that old caches are not reused.
_SAMPLE_VERSION = 1

SAMPLE_CATEGORIES = (
    {'name': 'circle', 'isthing': True, 'color': [220, 20, 60]},
    {'name': 'square', 'isthing': True, 'color': [0, 82, 200]},
    {'name': 'triangle', 'isthing': True, 'color': [250, 170, 30]},
    {'name': 'sky', 'isthing': False, 'color': [70, 130, 180]},
    {'name': 'grass', 'isthing': False, 'color': [107, 142, 35]},
    {'name': 'water', 'isthing': False, 'color': [0, 90, 140]},
    {'name': 'sand', 'isthing': False, 'color': [210, 190, 140]},
)
SAMPLE_SIZE = 64
SAMPLE_HW = (96, 128)
# Thing colours that stand out against every background.
_THING_RGB = ((230, 40, 40), (250, 140, 0), (150, 50, 200), (240, 230, 40),
              (250, 250, 250), (230, 60, 170), (30, 30, 30))


def _stuff_texture(name: str, h: int, w: int, rng) -> np.ndarray:
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  noise = rng.normal(0, 1, (h, w)).astype(np.float32)
  if name == 'sky':
    t = y / h
    rgb = np.stack([90 + 60 * t, 150 + 50 * t, 235 + 0 * t], -1)
    rgb += 4 * noise[..., None]
  elif name == 'grass':
    blades = np.sin(x * 1.7 + 3 * noise) * 12
    rgb = np.stack([60 + blades, 140 + blades + 8 * noise, 40 + 0 * x], -1)
  elif name == 'water':
    waves = np.sin(y * 0.9 + np.sin(x * 0.2) * 2) * 14
    rgb = np.stack([20 + 0 * x, 90 + waves, 160 + waves + 4 * noise], -1)
  else:  # sand
    rgb = np.stack([205 + 0 * x, 180 + 0 * x, 120 + 0 * x], -1)
    rgb += 12 * noise[..., None]
  return np.clip(rgb, 0, 255)


def _shape_mask(kind: int, h: int, w: int, rng) -> np.ndarray:
  """A random circle (0), square (1) or triangle (2) as a bool [H, W] mask."""
  size = rng.uniform(8, 22)
  cy, cx = rng.uniform(size, h - size), rng.uniform(size, w - size)
  angle = rng.uniform(0, 2 * np.pi)
  mask = Image.new('L', (w, h), 0)
  draw = ImageDraw.Draw(mask)
  if kind == 0:
    draw.ellipse([cx - size, cy - size, cx + size, cy + size], fill=1)
  else:
    corners = 4 if kind == 1 else 3
    turns = angle + 2 * np.pi * np.arange(corners) / corners
    draw.polygon([(cx + size * np.cos(t), cy + size * np.sin(t))
                  for t in turns], fill=1)
  return np.asarray(mask, bool)


def sample_example(i: int) -> tuple[np.ndarray, np.ndarray, list]:
  """Synthetic image i: (uint8 image, int32 ids, segments); deterministic."""
  h, w = SAMPLE_HW
  rng = np.random.default_rng([_SAMPLE_VERSION, i])
  horizon = int(rng.integers(h * 3 // 10, h * 6 // 10))
  ground = int(rng.integers(4, 7))  # grass, water or sand
  image = np.concatenate([_stuff_texture('sky', horizon, w, rng),
                          _stuff_texture(SAMPLE_CATEGORIES[ground]['name'],
                                         h - horizon, w, rng)])
  ids = np.ones((h, w), np.int32)
  ids[horizon:] = 2
  segments = [(1, 3, False), (2, ground, False)]
  for k in range(int(rng.integers(1, 4))):
    kind = int(rng.integers(3))
    mask = _shape_mask(kind, h, w, rng)
    colour = np.array(_THING_RGB[rng.integers(len(_THING_RGB))], np.float32)
    shade = 1 - 0.25 * np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    image = np.where(mask[..., None], colour * shade, image)
    ids[mask] = 3 + k
    segments.append((3 + k, kind, False))
  present = set(np.unique(ids).tolist())  # Shapes may hide each other.
  segments = [s for s in segments if s[0] in present]
  return np.round(image).astype(np.uint8), ids, segments


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'PNG', compress_level=1)
  return buffer.getvalue()


def _sample_item(i: int) -> writer.SourceItem:
  example = functools.cache(lambda: sample_example(i))
  return writer.SourceItem(
      image_id=f'shapes_{i:03d}', name=f'shapes_{i:03d}',
      image=lambda: _png(example()[0]),
      annotation=lambda: writer.Annotation(*example()[1:]))


def sample_segmentation_dir() -> str:
  """Directory of the built-in sample set, building it on first use."""
  out = os.path.join(sample_set.cache_dir(), 'datasets',
                     f'{SAMPLE_NAME}-v{_SAMPLE_VERSION}')
  if folder.is_dataset_dir(out):
    return out
  report = writer.write_segmentation_dataset(
      out, [_sample_item(i) for i in range(SAMPLE_SIZE)], SAMPLE_CATEGORIES,
      dataset=SAMPLE_NAME, split='train', kind='panoptic', exist_ok=True,
      source='synthesised by visgen_jax.data.segmentation.sample')
  logging.info('Segmentation sample set: %d images in %s',
               report.num_examples, out)
  return out
