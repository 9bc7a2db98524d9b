"""The one exception type for mistakes a user can fix.

Anything raised as `UserError` reaches the user as one sentence and exit code 2
(see `visgen_jax.main`); everything else is a bug and keeps its traceback.
Libraries below the systems (models/) raise plain `ValueError`s in their own
words; the system that passed them a setting translates with `for_setting`.
"""

import contextlib


class UserError(Exception):
  """A wrong config key, a missing dataset, an image of the wrong size, ..."""


class TrainingDiverged(Exception):
  """The loss or gradient norm stopped being finite; nothing after it was saved."""


@contextlib.contextmanager
def for_setting(setting: str):
  """Re-raises a ValueError from inside as a UserError naming the setting it
  came from: `with for_setting('config.model'): PatchUNet(**config.model).layout()`
  → "config.model: patch_size=60 with 4 levels gives ..."."""
  try:
    yield
  except ValueError as e:
    raise UserError(f'{setting}: {e}') from None
