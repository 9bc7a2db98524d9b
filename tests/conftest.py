"""Fixtures shared by test modules."""

import pytest


@pytest.fixture(scope='module')
def private_cache(tmp_path_factory):
  """A VISGEN_CACHE of the module's own (built-in datasets are made there), shared by its tests."""
  path = str(tmp_path_factory.mktemp('cache'))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('VISGEN_CACHE', path)
    yield path
