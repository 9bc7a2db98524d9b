"""What the project's commands share: absl flags plus `--config.key=value`
overrides, and user mistakes as one sentence with exit code 2."""

import sys

from absl import app, flags, logging

from visgen_jax.errors import TrainingDiverged, UserError


def fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def run(command, overrides: list):
  """app.run(command); `--config.*` arguments go to `overrides`, not to absl.

  `command(argv)` may raise UserError: it becomes one line on stderr and exit 2
  (TrainingDiverged: one line and exit 1).
  """
  def parse(argv):
    overrides.extend(a[len('--config.'):] for a in argv[1:] if a.startswith('--config.'))
    try:
      return flags.FLAGS([a for a in argv if not a.startswith('--config.')])
    except flags.Error as e:
      fail(str(e))

  def guarded(argv):
    try:
      command(argv)
    except UserError as e:
      fail(str(e))
    except TrainingDiverged as e:
      fail(str(e), code=1)

  logging.set_verbosity(logging.WARNING)  # Orbax and grain narrate every step at INFO
  app.run(guarded, flags_parser=parse)
