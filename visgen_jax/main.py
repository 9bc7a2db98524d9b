"""The one entry point.

  python -m visgen_jax.main --config=configs/<experiment>.py[:variant] --workdir=DIR \\
      [--mode=train|sample|eval|<system command>] [--config.key=value ...]

Mistakes a user can fix (a wrong key, a value of the wrong type, a missing
dataset, a mesh the devices cannot form) end with one sentence and exit code 2,
before anything is written to the workdir.
"""

import os

from absl import flags

from visgen_jax import cli
from visgen_jax.errors import UserError

flags.DEFINE_string('config', None, 'configs/<experiment>.py[:variant]; override keys with --config.key=value.')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_string('mode', 'train', 'train, sample, eval (the evaluators of config.evals), or a command of the system (e.g. outpaint).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host: TPU pod, SLURM, or the flags below).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host without a cluster environment).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host without a cluster environment).')
flags.DEFINE_integer('process_id', None, 'This process index (multi-host without a cluster environment).')
FLAGS = flags.FLAGS

_overrides = []


def run(argv):
  del argv
  # After flag parsing: keeps --help fast.
  from visgen_jax import data, systems  # pylint: disable=g-import-not-at-top
  from visgen_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  if not FLAGS.config or not FLAGS.workdir:
    raise UserError('--config and --workdir are required, e.g. --config=configs/adm_ffhq256.py:tiny --workdir=/tmp/run.')
  config = config_lib.load_config(FLAGS.config, _overrides)
  config_lib.validate(config)
  data.validate(config.data)
  systems.validate(config)
  if FLAGS.distributed:
    import jax
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from visgen_jax.train import trainer
  workdir = os.path.abspath(FLAGS.workdir)
  if FLAGS.mode == 'train':
    trainer.train(config, workdir)
  else:
    systems.run_command(config, workdir, FLAGS.mode, trainer)


def main():
  cli.run(run, _overrides)


if __name__ == '__main__':
  main()
