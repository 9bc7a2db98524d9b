"""Image files for every system: read as RGB, convert to and from [-1, 1], resize
and crop, write PNGs atomically from process 0, and image grids.

Images are uint8 arrays [H, W, 3] on disk's side and float32 in [-1, 1] on the
model's side (`to_float`, `to_uint8`). Reading gives every file the same kind
of pixels whatever its format:
  - EXIF orientation is applied: a photo stored sideways comes out upright;
  - 16-bit grayscale is scaled to 8 bits (v / 257), not clipped;
  - palette, grayscale and CMYK images become RGB;
  - alpha (RGBA, LA, PA, palette transparency) is composited on white, as the
    image shows on a page; dropping it would expose whatever colour the
    transparent pixels happen to store (often black). The datasets built by
    data_prep/ hold the same pixels, so an edit sees an image as training did.

Writing: a file appears complete or not at all (written beside its target,
then renamed), with the mode a plain file gets under the process's umask, and
only process 0 writes, so a multi-host run writes each file once.

(Named image_io, not images: `images` is the arrays' name everywhere.)
"""

import math
import os
import tempfile

import numpy as np
from PIL import Image
from PIL import ImageOps

from visgen_jax.errors import UserError

SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def load_rgb(source, draft_hw: tuple[int, int] | None = None,
             exif_transpose: bool = True) -> tuple[Image.Image, str]:
  """Decodes an image (a path or a file object) fully as RGB.

  Returns it and its original mode. `draft_hw` lets JPEG decode at a reduced
  scale that still covers (H, W). `exif_transpose=False` keeps the stored pixel
  order, which annotation maps made for the file are aligned with. Raises
  whatever Pillow raises for a corrupt or truncated file.
  """
  with Image.open(source) as img:
    mode = img.mode
    if draft_hw is not None:
      # JPEG can decode at 1/2, 1/4, 1/8 scale for free; ask for a size that
      # still covers the target in either orientation (EXIF may rotate it).
      side = max(draft_hw)
      img.draft(None, (side, side))
    img.load()
    if exif_transpose:
      img = ImageOps.exif_transpose(img)
  if img.mode in SIXTEEN_BIT_MODES:
    # 16-bit grayscale: convert('RGB') would clip instead of rescaling.
    gray = np.asarray(img, dtype=np.float64) / 257.0
    img = Image.fromarray(np.clip(np.round(gray), 0, 255).astype(np.uint8))
  if img.mode in ('RGBA', 'LA', 'PA') or (
      img.mode == 'P' and 'transparency' in img.info):
    rgba = img.convert('RGBA')
    img = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    img.alpha_composite(rgba)
  if img.mode != 'RGB':
    img = img.convert('RGB')
  return img, mode


def read_rgb(path: str, where: str) -> np.ndarray:
  """The image file at `path` as uint8 [H, W, 3]. A missing or unreadable file
  is a UserError naming `where`, the setting that gave the path (e.g.
  'config.edit.input')."""
  if not path or not os.path.isfile(path):
    raise UserError(f'{where}={path!r}: no such file; give the path of an image (PNG, JPEG, WebP).')
  try:
    image, _ = load_rgb(path)
  except (OSError, Image.DecompressionBombError) as e:
    raise UserError(f'{where}={path!r} is not a readable image ({e}).') from None
  return np.asarray(image)


def to_float(images) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]."""
  return np.asarray(images, np.float32) / 127.5 - 1


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8, rounding as guided_diffusion's sample script does."""
  return np.asarray(np.clip((np.asarray(images, np.float32) + 1) * 127.5, 0, 255).round(), np.uint8)


def resize_and_crop(image: Image.Image | np.ndarray, hw: tuple[int, int], crop: str,
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [H, W, C]: `image` resized (bicubic) to cover (H, W) keeping its aspect,
  then cropped to (H, W) at the centre ('center') or at a place drawn from `rng`
  ('random'); crop='none' stretches it to (H, W) instead."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  h, w = hw
  if crop == 'none':
    return np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))
  scale = max(h / image.height, w / image.width)
  # max(): rounding must not fall a pixel short of the target.
  new_w = max(w, round(image.width * scale))
  new_h = max(h, round(image.height * scale))
  if (new_w, new_h) != image.size:
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  if crop == 'center':
    top, left = (new_h - h) // 2, (new_w - w) // 2
  else:
    top = int(rng.integers(new_h - h + 1))
    left = int(rng.integers(new_w - w + 1))
  return np.asarray(image)[top:top + h, left:left + w]


def image_grid(images, cols: int | None = None) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 [rows*H, cols*W, 3] grid (row by row; `cols` columns,
  default the square's), 2 px white gaps."""
  images = to_uint8(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + 2) - 2, cols * (w + 2) - 2, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * (h + 2):r * (h + 2) + h, q * (w + 2):q * (w + 2) + w] = img
  return grid


def is_writer() -> bool:
  """Whether this process writes output files: process 0 only."""
  import jax  # here, not at the top: the data_prep commands read images without JAX
  return jax.process_index() == 0


def umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_atomically(path: str, write):
  """write(tmp_path) then rename onto path: a reader never sees half a file. Any
  kind of file (PNG, JSON, ...); the caller decides which process writes."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=os.path.splitext(path)[1])
  os.close(handle)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; give it a plain file's mode
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def save_png(path: str, image: np.ndarray):
  """uint8 [H, W, 3] (or [H, W]) as a PNG at path, atomically, from process 0 only."""
  if is_writer():
    write_atomically(path, lambda tmp: Image.fromarray(image).save(tmp, format='PNG'))


def save_pngs(directory: str, images):
  """[N, H, W, C] in [-1, 1] as directory/00000.png, 00001.png, ... and
  directory/grid.png, each atomically, from process 0 only."""
  for i, image in enumerate(to_uint8(images)):
    save_png(os.path.join(directory, f'{i:05d}.png'), image)
  save_png(os.path.join(directory, 'grid.png'), image_grid(images))
