"""Inception outputs of many images: batched, jitted, split over this process's devices and over
processes, every image counted once (the last batch is padded and the padding dropped)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from visgen_jax.fid.inputs import Images
from visgen_jax.fid.metrics import Measured
from visgen_jax.models.inception import OUTPUT_DIMS, InceptionV3


def _rebatch(chunks, size: int):
  """Arrays of `size` rows (the last may have fewer) from chunks of any length."""
  pending, count = [], 0
  for chunk in chunks:
    pending.append(chunk)
    count += len(chunk)
    while count >= size:
      joined = np.concatenate(pending)
      yield joined[:size]
      pending, count = [joined[size:]], count - size
  if count:
    yield np.concatenate(pending)


class FeatureExtractor:
  """Inception outputs (models/inception.py) of uint8 images [N, H, W, 3] on this process's
  devices: batches of `batch_size` (rounded up to a multiple of the device count) split over
  them, the parameters replicated."""

  def __init__(self, params, batch_size: int):
    devices = jax.local_devices()
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ('batch',))
    self._split = NamedSharding(mesh, PartitionSpec('batch'))
    self._params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    model = InceptionV3()
    self._apply = jax.jit(
        lambda p, images: model.apply({'params': p}, images.astype(jnp.float32) / 255),
        out_shardings=self._split)

  def __call__(self, chunks, total: int, desc: str) -> dict[str, np.ndarray]:
    """The outputs of every image of `chunks` (uint8 arrays of any length, `total` images in
    all), in order, as float32 numpy arrays; a progress bar on process 0."""
    outputs, pending = [], None
    with tqdm(total=total, desc=desc, unit='image', leave=False,
              disable=jax.process_index() != 0) as bar:
      for batch in _rebatch(chunks, self.batch_size):
        padded = np.zeros((self.batch_size, *batch.shape[1:]), np.uint8)
        padded[:len(batch)] = batch
        running = (self._apply(self._params, jax.device_put(padded, self._split)), len(batch))
        if pending:  # fetched one batch late: the next batch is read while this one runs
          outputs.append(self._fetch(*pending))
          bar.update(pending[1])
        pending = running
      if pending:
        outputs.append(self._fetch(*pending))
        bar.update(pending[1])
    if not outputs:
      return {k: np.zeros((0, width), np.float32) for k, width in OUTPUT_DIMS.items()}
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

  @staticmethod
  def _fetch(result, count):
    return {k: np.asarray(v)[:count] for k, v in jax.device_get(result).items()}


def gather_in_order(order, features: dict) -> dict:
  """Every process's `features` rows (numbered by `order`: their global positions) put
  together in that order, the same on every process."""
  order = np.asarray(order, np.int64)
  if jax.process_count() > 1:
    counts = multihost_utils.process_allgather(np.int64(len(order))).reshape(-1)
    pad = int(counts.max()) - len(order)
    padded_order = np.concatenate([order, np.full(pad, -1)])
    order = multihost_utils.process_allgather(padded_order).reshape(-1)
    features = {k: multihost_utils.process_allgather(
        np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])).reshape(-1, *v.shape[1:])
                for k, v in features.items()}
    keep = order >= 0
    order, features = order[keep], {k: v[keep] for k, v in features.items()}
  ranks = np.argsort(order, kind='stable')
  return {k: v[ranks] for k, v in features.items()}


def process_range(count: int) -> range:
  """This process's contiguous share of `count` items."""
  index, processes = jax.process_index(), jax.process_count()
  return range(count * index // processes, count * (index + 1) // processes)


def extract_all(images: Images, extractor: FeatureExtractor, desc: str) -> dict:
  """The Inception outputs of every image, each process computing its own range."""
  mine = process_range(images.count)
  chunks = (images.read(start, min(start + extractor.batch_size, mine.stop))
            for start in range(mine.start, mine.stop, extractor.batch_size))
  return gather_in_order(np.arange(mine.start, mine.stop), extractor(chunks, len(mine), desc))


def measure(side, extractor: FeatureExtractor, desc: str) -> Measured:
  """A side of a comparison (inputs.Input): its images' outputs, and its statistics (its own
  when the file has them: the ADM evaluator's rule)."""
  features = extract_all(side.images, extractor, desc) if side.images is not None else None
  if side.pool is not None:
    return Measured(features, side.pool, side.spatial)
  return Measured.of(features)
