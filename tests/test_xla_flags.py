"""The project's default XLA flags: added when absent, never over the user's."""

import importlib.metadata

from visgen_jax import xla_flags


def test_defaults_are_added_beside_other_flags_and_never_replace_the_users():
  if not importlib.metadata.version('jaxlib').startswith(xla_flags.MEASURED_ON):
    untouched = {}
    xla_flags.apply_defaults(untouched)
    assert untouched == {}
    return
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  xla_flags.apply_defaults(env)
  expected = [f'--{name}={value}' for name, value in xla_flags.CPU_DEFAULTS.items()]
  assert env['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=2', *expected]
  users = {'XLA_FLAGS': ' '.join(f'--{name}=' for name in xla_flags.CPU_DEFAULTS)}
  before = dict(users)
  xla_flags.apply_defaults(users)
  assert users == before
  empty = {}
  xla_flags.apply_defaults(empty)
  assert empty['XLA_FLAGS'].split() == expected
  assert xla_flags.without_defaults(env['XLA_FLAGS']) == '--xla_force_host_platform_device_count=2'
