"""The one exception type for mistakes a user can fix.

Anything raised as `UserError` reaches the user as one sentence and exit code 2
(see `visgen_jax.main`); everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A wrong config key, a missing dataset, an image of the wrong size, ..."""


class TrainingDiverged(Exception):
  """The loss or gradient norm stopped being finite; nothing after it was saved."""
