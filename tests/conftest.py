"""Fixtures shared by test modules, and one XLA compilation cache for the run."""

import os
import shutil
import tempfile

import pytest

# Many tests compile the same tiny train and sample steps, in both xdist workers
# and in the CLI subprocesses they start (which inherit the environment): the
# first compile of a program is stored, the others load it. The controller
# makes the directory before the workers start and removes it at the end.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='visgen_jax_tests_xla_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.3'


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


@pytest.fixture(scope='module')
def private_cache(tmp_path_factory):
  """A VISGEN_CACHE of the module's own (built-in datasets are made there), shared by its tests."""
  path = str(tmp_path_factory.mktemp('cache'))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('VISGEN_CACHE', path)
    yield path
