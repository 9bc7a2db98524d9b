"""'rig_subjects': a built-in synthetic set of face-like subjects with known buffers (DiffusionRig).

Each of NUM_SUBJECTS subjects is an ellipsoid head of its own proportions with
its own albedo texture (its "identity": a base colour, eyes and sinusoidal
detail), seen IMAGES_PER_SUBJECT times under a random SH light and a small
random rotation, in front of a background pattern drawn independently of the
subject (what only an image's global code can explain). The renderer is known,
so `render` draws any subject under any light (ground truth for relighting).

Buffers: normals, alpha, light and pose are exact; the 'albedo' buffer is
coarse, as a 3DMM's would be: the base colour and the eyes without the detail
the image is rendered with, and 'rendered' shades that coarse albedo (the
buffer DECA would render). DECA's albedo comes from FLAME's low-dimensional
texture model and misses identity detail, which stage 2 learns from the album;
with an exact albedo the buffers would carry the whole identity and
personalisation would have nothing to learn.

data keys: resolution (square), subjects = 'all' | 'album' (only subject
album_subject: the stage-2 album) | 'others' (every subject but that one).
Batches: 'image', 'rendered', 'normal', 'albedo' float32 [b, H, W, 3] (image
in [-1, 1], buffers raw: normals in [-1, 1] and 0 outside the face, albedo in
[0, 1], rendered = sh_lighting.shade), 'alpha' float32 [b, H, W], 'index'
int32 [b], and 'physical' float32 [b, PHYSICAL_SIZE]: the renderer's parameters as one
vector (the light [9, 3] flattened, the head's yaw and pitch, its semi-axes; what the
vector-conditioned DiffusionRig sees). With data.random_flip the buffers flip with the
image and the normals' x changes sign; 'physical' does not change (a mirrored light is
not modelled), so the vector-conditioned model refuses random_flip. Records also hold
those parts ('light', 'head_pose', 'head_axes') and 'subject' (`records(data_config)`).

Built on first use into `$VISGEN_CACHE/datasets/` as one .npz per resolution
(a private file renamed into place, so concurrent builders do not clash).
"""

import math
import os
import tempfile

import numpy as np

from visgen_jax.data import registry, sample_set
from visgen_jax.errors import UserError
from visgen_jax.models import sh_lighting

NUM_SUBJECTS = 8
IMAGES_PER_SUBJECT = 16
SUBJECT_CHOICES = ('all', 'album', 'others')
BUFFERS = ('rendered', 'normal', 'albedo')  # the order the model concatenates them in
MAX_ANGLE = 0.25  # radians of yaw and pitch
# The parts of the 'physical' vector, in order, and their shapes (also an edit input's .npz keys).
PHYSICAL = {'light': (9, 3), 'head_pose': (2,), 'head_axes': (3,)}
_VERSION = 3


def subject_shape(subject: int) -> np.ndarray:
  """The head's semi-axes (x, y, z)."""
  rng = np.random.default_rng([subject, 0])
  return np.array([rng.uniform(0.5, 0.65), rng.uniform(0.65, 0.82), 0.6], np.float32)


def random_light(rng) -> np.ndarray:
  """[9, 3]: mostly ambient, a random main direction, a little colour and second order."""
  light = np.zeros((9, 3), np.float32)
  light[0] = 0.75 / sh_lighting.CONSTANTS[0] * rng.uniform(0.9, 1.1, 3)
  light[1:4] = (rng.normal(size=3) * 0.35 / sh_lighting.CONSTANTS[1])[:, None] * rng.uniform(0.9, 1.1, 3)
  light[4:] = rng.normal(size=(5, 3)) * 0.05
  return light


def _rotation(yaw: float, pitch: float) -> np.ndarray:
  cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
  about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  about_x = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
  return (about_y @ about_x).astype(np.float32)


def _albedo(subject: int, q: np.ndarray, detail: bool) -> np.ndarray:
  """The subject's texture at head-frame points q [..., 3] (it turns with the head): base colour
  and eyes, and with `detail` the sinusoidal identity detail (what a 3DMM's albedo misses)."""
  rng = np.random.default_rng([subject, 1])
  base = rng.uniform(0.35, 0.85, 3)
  freq, phase, amp = rng.uniform(2, 6, (3, 3)), rng.uniform(0, 2 * math.pi, 3), rng.uniform(0.05, 0.15, 3)
  texture = base + detail * sum(amp[i] * np.sin(q @ freq[i] + phase[i])[..., None] for i in range(3))
  eyes = sum(np.exp(-((q[..., 0] - s * 0.22) ** 2 + (q[..., 1] - 0.15) ** 2) / 0.006) for s in (-1, 1))
  return np.clip(texture * (1 - 0.7 * eyes[..., None]), 0.02, 1).astype(np.float32)


def background(rng, resolution: int) -> np.ndarray:
  """A subject-independent pattern: a tilted two-colour stripe field and a "hair" cap colour."""
  v, u = np.mgrid[1:-1:resolution * 1j, -1:1:resolution * 1j]
  angle, freq = rng.uniform(0, math.pi), rng.uniform(2, 8)
  stripes = 0.5 + 0.5 * np.sin(freq * (u * math.cos(angle) + v * math.sin(angle)))[..., None]
  return (rng.uniform(0, 1, 3) * stripes + rng.uniform(0, 1, 3) * (1 - stripes)).astype(np.float32)


def render(subject: int, light, yaw: float, pitch: float, resolution: int, background=None) -> dict:
  """One image of `subject` (full texture) and its buffers (coarse albedo), an orthographic view of
  the rotated head; 'texture' is the full texture, masked (not a buffer: ground truth)."""
  v, u = np.mgrid[1:-1:resolution * 1j, -1:1:resolution * 1j].astype(np.float32)
  axes, rotation = subject_shape(subject), _rotation(yaw, pitch)
  # Points p = (u, v, z) on the ray; in the head frame q = R^T p lies on q^T D q = 1.
  d = rotation.T @ np.diag(1 / axes**2) @ rotation  # the ellipsoid in the world frame
  a = d[2, 2]
  b = 2 * (d[0, 2] * u + d[1, 2] * v)
  c = d[0, 0] * u * u + d[1, 1] * v * v + 2 * d[0, 1] * u * v - 1
  disc = b * b - 4 * a * c
  alpha = (disc > 0).astype(np.float32)
  z = (-b + np.sqrt(np.maximum(disc, 0))) / (2 * a)  # the surface facing the camera (+z)
  p = np.stack([u, v, z], axis=-1)
  normal = p @ d  # gradient of p^T D p (D symmetric)
  normal = normal / np.linalg.norm(normal, axis=-1, keepdims=True) * alpha[..., None]
  q = p @ rotation  # q = R^T p, row-wise
  texture, albedo = (_albedo(subject, q, detail) * alpha[..., None] for detail in (True, False))
  light = np.asarray(light, np.float32)
  face, rendered = (np.asarray(sh_lighting.shade(normal, a, alpha, light)) for a in (texture, albedo))
  background = np.zeros_like(face) if background is None else background
  image = np.clip(face + background * (1 - alpha[..., None]), 0, 1) * 2 - 1
  return {'image': image.astype(np.float32), 'rendered': rendered.astype(np.float32),
          'normal': normal.astype(np.float32), 'albedo': albedo, 'alpha': alpha, 'texture': texture}


def _build(resolution: int) -> dict:
  rng = np.random.default_rng(1234)
  examples = []
  for subject in range(NUM_SUBJECTS):
    for _ in range(IMAGES_PER_SUBJECT):
      light = random_light(rng)
      yaw, pitch = rng.uniform(-MAX_ANGLE, MAX_ANGLE, 2)
      example = render(subject, light, yaw, pitch, resolution, background(rng, resolution))
      del example['texture']  # ground truth, not part of the set
      examples.append(dict(example, light=light, head_pose=np.array([yaw, pitch], np.float32),
                           head_axes=subject_shape(subject), subject=np.int32(subject)))
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def dataset_file(resolution: int) -> str:
  """The built set's .npz, built on first use."""
  root = os.path.join(sample_set.cache_dir(), 'datasets')
  path = os.path.join(root, f'rig_subjects-v{_VERSION}-{resolution}.npz')
  if not os.path.isfile(path):
    os.makedirs(root, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.rig_subjects-', suffix='.npz', dir=root)
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **_build(resolution))
    os.replace(tmp, path)
  return path


class Records:
  """The selected examples as a random-access sequence of dicts."""

  def __init__(self, arrays: dict, indices: np.ndarray):
    self.arrays, self.indices = arrays, indices

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    index = int(self.indices[i])
    return dict({k: v[index] for k, v in self.arrays.items()}, index=np.int32(index))


def records(data_config) -> Records:
  with np.load(dataset_file(int(data_config.resolution))) as f:
    arrays = dict(f)
  subject = arrays['subject']
  album = subject == data_config.album_subject
  chosen = {'all': np.ones_like(album), 'album': album, 'others': ~album}[data_config.subjects]
  return Records(arrays, np.flatnonzero(chosen))


def physical_size(parts: dict) -> int:
  return sum(math.prod(shape) for shape in parts.values())


PHYSICAL_SIZE = physical_size(PHYSICAL)


def physical_vector(example: dict, parts: dict) -> np.ndarray:
  """The `parts` ({key: shape}) of one example, flattened and concatenated in order."""
  return np.concatenate([np.asarray(example[k], np.float32).reshape(-1) for k in parts])


def _example(record, rng=None):
  return dict({k: record[k] for k in ('image', *BUFFERS, 'alpha', 'index')},
              physical=physical_vector(record, PHYSICAL))


def _identity(batch):
  return batch


def spec(hw: tuple[int, int], physical_size: int = PHYSICAL_SIZE) -> dict:
  """A batch's examples at H x W (also those of 'rig_folder', with its own physical_size)."""
  color = registry.Feature((*hw, 3), np.float32, width_axis=1)
  return {'image': color, 'rendered': color, 'albedo': color,
          'normal': registry.Feature((*hw, 3), np.float32, width_axis=1, flip_sign=(-1, 1, 1)),
          'alpha': registry.Feature(hw, np.float32, width_axis=1), 'index': registry.Feature((), np.int32),
          'physical': registry.Feature((physical_size,), np.float32)}


@registry.register('rig_subjects')
class RigSubjects(registry.Source):
  keys = ('resolution', 'subjects', 'album_subject')

  def check(self, data_config):
    if not isinstance(data_config.resolution, int) or data_config.resolution < 8:
      raise UserError(f'data.resolution={data_config.resolution!r}: rig_subjects is square; give one size >= 8.')
    if data_config.get('subjects') not in SUBJECT_CHOICES:
      raise UserError(f'data.subjects={data_config.get("subjects")!r}; allowed: {", ".join(SUBJECT_CHOICES)}.')
    if not 0 <= data_config.get('album_subject', 0) < NUM_SUBJECTS:
      raise UserError(f'data.album_subject={data_config.album_subject}; allowed: 0 to {NUM_SUBJECTS - 1}.')

  def open(self, data_config):
    recs = records(data_config)
    return recs, registry.SourceInfo(self.name, dataset_file(int(data_config.resolution)), len(recs))

  def spec(self, data_config):
    return spec((data_config.resolution,) * 2)

  def transform(self, data_config, info, train):
    return _example

  def finish(self, data_config, info):
    return _identity
