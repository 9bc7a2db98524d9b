"""The 'fid' evaluator: FID, sFID, Inception Score, KID and precision/recall of a system's samples
against a reference, with the FID Inception (visgen_jax/fid).

  c.evals.fid = ml_collections.ConfigDict(dict(
      type='fid', reference='/data/VIRTUAL_ffhq256.npz', num_samples=50_000, batch_size=50,
      inception='/weights/pt_inception-2015-12-05-6726825d.pth'))

Samples come from `system.sample(params, key)` (config.sample.num images in [-1, 1] a call),
quantised to uint8 as saved PNGs are, with keys that depend on config.seed, the step and the
call only; the calls are shared out over processes (call i on process i mod P) and the first
num_samples images in call order are kept, so the set does not depend on the process count. The
reference is measured once, on the first evaluation, and kept.
"""

import math

import jax

from visgen_jax import image_io
from visgen_jax.convert.inception import load_inception
from visgen_jax.data import registry as data_registry
from visgen_jax.errors import UserError
from visgen_jax.eval import process_local, register
from visgen_jax.fid import features, inputs, metrics

_KEY_STREAM = 0xF1D  # the samples' keys: their own stream of config.seed


def _reference(config, path: str, where: str) -> inputs.Input:
  """The reference at `path`, or '' for config.data's dataset as evaluation reads it (centre
  crops at data.resolution)."""
  if path:
    return inputs.open_input(path, where)
  source = data_registry.validate(config.data)
  records, info = source.open(config.data)
  side = inputs.Input(inputs.RecordImages(records, source.transform(config.data, info, train=False)))
  if side.images.count < 2:
    raise UserError(f'{where}=\'\' reads config.data, which holds {side.images.count} image; FID '
                    'needs at least 2.')
  return side


def sample_features(sample, params, key, num_samples: int, per_call: int,
                    extractor: features.FeatureExtractor) -> dict:
  """Inception outputs of the first `num_samples` images of calls sample(params, fold_in(key,
  i)), i = 0, 1, ..., each returning `per_call` images in [-1, 1]; this process makes calls
  process_index, process_index + process_count, ..."""
  calls = range(jax.process_index(), math.ceil(num_samples / per_call), jax.process_count())
  kept = {call: min(per_call, num_samples - call * per_call) for call in calls}

  def images(call):  # uint8 as saved PNGs are
    return image_io.to_uint8(jax.device_get(sample(params, jax.random.fold_in(key, call))))

  chunks = (images(call)[:kept[call]] for call in calls)
  local = extractor(chunks, sum(kept.values()), 'samples')
  order = [call * per_call + i for call in calls for i in range(kept[call])]
  return features.gather_in_order(order, local)


@register('fid', reference='', num_samples=50_000, batch_size=50, inception='')
def build_fid(config, settings, system, where):
  """fid, sfid, inception_score, kid, kid_std, precision and recall of settings.num_samples
  samples against settings.reference: an .npz batch or statistics (the ADM evaluator's
  layouts), an image folder, a dataset made by data_prep/, or '' for config.data's dataset.
  settings.inception: pytorch-fid's weights file or its conversion; settings.batch_size:
  Inception batch per process. Metrics the reference does not allow are left out (statistics
  only: no KID, precision or recall; no mu_s / sigma_s: no sFID)."""
  if system.sample is None:
    raise UserError(f'{where}.type=fid needs a system that samples; config.system={config.system!r} '
                    'does not.')
  for name in ('num_samples', 'batch_size'):
    value, least = settings[name], 2 if name == 'num_samples' else 1
    if not isinstance(value, int) or value < least:
      raise UserError(f'{where}.{name}={value!r} is not allowed: use an integer of at least {least}.')
  reference = _reference(config, settings.reference, f'{where}.reference')
  extractor = features.FeatureExtractor(load_inception(settings.inception, f'{where}.inception'),
                                        settings.batch_size)
  key = jax.random.fold_in(jax.random.key(config.seed), _KEY_STREAM)
  measured_reference = []  # filled on the first evaluation

  def evaluate(params, step):
    if not measured_reference:
      measured_reference.append(features.measure(reference, extractor, 'reference'))
    sampled = sample_features(system.sample, process_local(params), jax.random.fold_in(key, step),
                              settings.num_samples, config.sample.num, extractor)
    values, _ = metrics.compare(metrics.Measured.of(sampled), measured_reference[0])
    return values

  return evaluate
