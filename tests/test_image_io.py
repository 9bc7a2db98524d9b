"""Reading every kind of image file as RGB, conversions, resizing, grids and atomic PNG writes."""

import os

import jax
import numpy as np
from PIL import Image
import pytest

from visgen_jax import image_io
from visgen_jax.errors import UserError


def read(path):
  return image_io.read_rgb(str(path), 'config.test')


def test_exif_orientation_is_applied(tmp_path):
  # Stored 20 high x 40 wide: black left half, white right half. Orientation 6
  # means "rotate 90° clockwise to display": upright it is 40 x 20, black on top.
  stored = np.zeros((20, 40, 3), np.uint8)
  stored[:, 20:] = 255
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(stored).save(tmp_path / 'phone.jpg', exif=exif.tobytes(), quality=95)
  image = read(tmp_path / 'phone.jpg')
  assert image.shape == (40, 20, 3) and image.dtype == np.uint8
  assert image[:18].max() < 30 and image[22:].min() > 225


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
  levels = np.array([[0, 257 * 100, 65535]], np.uint16)
  Image.fromarray(levels).save(tmp_path / 'deep.png')
  with Image.open(tmp_path / 'deep.png') as stored:
    assert stored.mode == 'I;16'  # the case: Pillow keeps the 16 bits
  image = read(tmp_path / 'deep.png')
  np.testing.assert_array_equal(image, np.repeat(np.array([[[0], [100], [255]]], np.uint8), 3, -1))


def test_palette_images_take_their_palette_colours_and_transparency_is_white(tmp_path):
  indices = np.array([[0, 1, 2]], np.uint8)
  palette = [200, 10, 20, 0, 90, 250, 7, 7, 7] + [0] * (256 * 3 - 9)
  image = Image.fromarray(indices, 'P')
  image.putpalette(palette)
  image.save(tmp_path / 'palette.png')
  np.testing.assert_array_equal(read(tmp_path / 'palette.png'), [[[200, 10, 20], [0, 90, 250], [7, 7, 7]]])
  image.save(tmp_path / 'transparent.png', transparency=2)
  np.testing.assert_array_equal(read(tmp_path / 'transparent.png'),
                                [[[200, 10, 20], [0, 90, 250], [255, 255, 255]]])


def test_alpha_is_composited_on_white(tmp_path):
  rgba = np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 128], [40, 80, 120, 255]]], np.uint8)
  Image.fromarray(rgba).save(tmp_path / 'alpha.png')
  image = read(tmp_path / 'alpha.png')
  np.testing.assert_array_equal(image[0, [0, 1, 3]], [[255, 255, 255], [0, 0, 0], [40, 80, 120]])
  np.testing.assert_allclose(image[0, 2], 127, atol=1)  # half-transparent black: mid-grey


def test_grayscale_and_cmyk_become_rgb(tmp_path):
  Image.fromarray(np.array([[0, 128, 255]], np.uint8)).save(tmp_path / 'gray.png')
  np.testing.assert_array_equal(read(tmp_path / 'gray.png'), np.repeat([[[0], [128], [255]]], 3, -1))
  Image.new('CMYK', (8, 6), (0, 255, 255, 0)).save(tmp_path / 'print.jpg', quality=95)  # pure red ink
  image = read(tmp_path / 'print.jpg')
  assert image.shape == (6, 8, 3)
  assert image[..., 0].min() > 230 and image[..., 1:].max() < 25


def test_missing_or_unreadable_files_name_the_setting(tmp_path):
  with pytest.raises(UserError, match=r"config.test='.*nothing.png': no such file"):
    read(tmp_path / 'nothing.png')
  (tmp_path / 'broken.png').write_bytes(b'not a png')
  with pytest.raises(UserError, match=r"config.test='.*broken.png' is not a readable image"):
    read(tmp_path / 'broken.png')


def test_float_conversion_round_trips_every_level():
  levels = np.arange(256, dtype=np.uint8)
  floats = image_io.to_float(levels)
  assert floats.dtype == np.float32 and floats.min() == -1 and floats.max() == 1
  np.testing.assert_array_equal(image_io.to_uint8(floats), levels)
  np.testing.assert_array_equal(image_io.to_uint8([-3.0, 3.0]), [0, 255])  # clipped


def test_resize_covers_then_crops_centre():
  # 20 x 40: black | white | black columns; a cover resize to 10 x 10 keeps
  # the white middle and drops the black sides.
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, 10:30] = 255
  out = image_io.resize_and_crop(Image.fromarray(image), (10, 10), 'center')
  assert out.shape == (10, 10, 3)
  assert out[:, 1:-1].min() == 255
  np.testing.assert_array_equal(image_io.resize_and_crop(image, (10, 10), 'center'), out)  # arrays too
  stretched = image_io.resize_and_crop(Image.fromarray(image), (10, 10), 'none')
  assert stretched[:, 0].max() == 0 and stretched[:, 5].min() == 255


def test_grid_places_images_in_rows_with_white_gaps():
  images = np.stack([np.full((4, 6, 3), v, np.float32) for v in (-1.0, -0.5, 0.0, 0.5, 0.75)])
  grid = image_io.image_grid(images)
  assert grid.shape == (2 * 6 - 2, 3 * 8 - 2, 3)  # 5 images: 3 columns, 2 rows
  np.testing.assert_array_equal(grid[:4, :6], 0)
  np.testing.assert_array_equal(grid[6:, :6], 191)  # the fourth image: row 1, column 0
  np.testing.assert_array_equal(grid[6:, 8:14], 223)  # the fifth: row 1, column 1
  np.testing.assert_array_equal(grid[4:6], 255)
  np.testing.assert_array_equal(grid[6:, 16:], 255)  # no sixth image


@pytest.fixture
def umask_027():
  old = os.umask(0o027)
  yield
  os.umask(old)


def test_png_is_written_atomically_with_the_umask_mode(tmp_path, umask_027):
  path = tmp_path / 'out' / 'a.png'
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  image_io.save_png(str(path), image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  assert os.stat(path).st_mode & 0o777 == 0o640
  assert os.listdir(path.parent) == ['a.png']

  def write_half_then_fail(tmp):
    with open(tmp, 'wb') as f:
      f.write(b'\x89PNG half')
    raise RuntimeError('disk full')

  with pytest.raises(RuntimeError, match='disk full'):
    image_io.write_atomically(str(path), write_half_then_fail)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)  # the old file, whole
  assert os.listdir(path.parent) == ['a.png']  # no temporary file left


def test_pngs_and_grid_are_written_by_process_zero_only(tmp_path, monkeypatch):
  images = np.linspace(-1, 1, 2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
  image_io.save_pngs(str(tmp_path / 'zero'), images)
  assert sorted(os.listdir(tmp_path / 'zero')) == ['00000.png', '00001.png', 'grid.png']
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'zero' / '00001.png')),
                                image_io.to_uint8(images[1]))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'zero' / 'grid.png')),
                                image_io.image_grid(images))
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  image_io.save_pngs(str(tmp_path / 'one'), images)
  assert not (tmp_path / 'one').exists()
