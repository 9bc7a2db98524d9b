"""Compare sample images with reference images: FID, sFID, Inception Score, KID, precision, recall.

  python -m visgen_jax.fid SAMPLES REFERENCE --inception=pt_inception-2015-12-05-6726825d.pth \\
      [--save-stats=REFERENCE_STATS.npz] [--batch_size=50]

SAMPLES and REFERENCE are each an image folder, a dataset made by data_prep/, an .npz batch
(arr_0: uint8 [N, H, W, 3]) or an .npz of statistics (mu, sigma and optionally mu_s, sigma_s: the
ADM evaluator's reference layout; when a file has mu, its statistics are used). --inception is
pytorch-fid's weights file (read with torch) or its conversion (python -m visgen_jax.convert
--kind=inception). --save-stats writes REFERENCE's statistics in the ADM layout, to be given as
REFERENCE next time. --batch_size is per process, rounded up to a multiple of the local devices.

Prints one JSON line: fid, sfid, inception_score, kid, kid_std, precision, recall (those the
inputs allow: FID needs statistics or at least 2 images per side, sFID spatial statistics or
images on both sides, the Inception Score the sample images, KID and precision/recall images on
both sides), num_samples and num_reference (image counts, null for statistics), and
not_computed: {metric: why}. Mistakes end with one sentence and exit code 2.
"""

import json

import jax
from absl import flags

from visgen_jax import cli
from visgen_jax.errors import UserError

flags.DEFINE_string('inception', None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or the "
                    'directory python -m visgen_jax.convert --kind=inception made of it.')
flags.DEFINE_string('save-stats', None, "Write REFERENCE's statistics (mu, sigma, mu_s, sigma_s) to "
                    'this .npz.')
flags.DEFINE_integer('batch_size', 50, 'Images per Inception batch on each process.')
FLAGS = flags.FLAGS

_overrides = []


def run(argv):
  from visgen_jax.convert.inception import load_inception  # pylint: disable=g-import-not-at-top
  from visgen_jax.fid import features, inputs, metrics  # pylint: disable=g-import-not-at-top
  if _overrides:
    raise UserError(f'--config.{_overrides[0]}: this command has no config; its flags are '
                    '--inception, --save-stats and --batch_size.')
  if len(argv) != 3:
    raise UserError(f'give two paths, SAMPLES and REFERENCE, got {len(argv) - 1}: python -m '
                    'visgen_jax.fid SAMPLES REFERENCE --inception=PATH.')
  if FLAGS.batch_size < 1:
    raise UserError(f'--batch_size={FLAGS.batch_size} is not allowed; use a positive count.')
  save_to = FLAGS['save-stats'].value
  if save_to is not None and not save_to.endswith('.npz'):
    raise UserError(f'--save-stats={save_to!r} must name an .npz file.')
  samples = inputs.open_input(argv[1], 'SAMPLES')
  reference = inputs.open_input(argv[2], 'REFERENCE')
  if save_to is not None and reference.images is None:
    raise UserError(f'--save-stats: REFERENCE={argv[2]!r} holds statistics already, not images.')
  extractor = features.FeatureExtractor(load_inception(FLAGS.inception), FLAGS.batch_size)
  measured = [features.measure(side, extractor, name)
              for side, name in ((samples, 'samples'), (reference, 'reference'))]
  values, skipped = metrics.compare(*measured)
  if save_to is not None:
    inputs.save_statistics(save_to, measured[1])
  if jax.process_index() == 0:
    counts = [None if side.images is None else side.images.count for side in (samples, reference)]
    print(json.dumps({**values, 'num_samples': counts[0], 'num_reference': counts[1],
                      'not_computed': skipped}), flush=True)


def main():
  cli.run(run, _overrides)


if __name__ == '__main__':
  main()
