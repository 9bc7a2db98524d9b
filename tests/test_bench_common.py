"""bench.common.flops_report: XLA's FLOP count, achieved FLOP/s and MFU (no device needed)."""

import jax
import jax.numpy as jnp
import pytest

from visgen_jax.bench import common


def test_flops_of_a_matmul_and_mfu_from_a_given_peak():
  m, k, n = 32, 48, 16
  matmul = jax.jit(lambda a, b: a @ b)
  args = (jnp.ones((m, k)), jnp.ones((k, n)))
  report = common.flops_report(matmul, args, seconds=0.5, peak_flops_per_s=1e6)
  assert report['flops_per_step'] == 2 * m * n * k
  assert report['achieved_flops_per_s'] == 2 * 2 * m * n * k
  assert report['mfu'] == pytest.approx(4 * m * n * k / 1e6)
  assert report['mfu_note'] is None


def test_unknown_peak_leaves_mfu_null_with_the_reason():
  report = common.flops_report(jax.jit(jnp.dot), (jnp.ones((4, 4)),) * 2, 1.0, dtype='bfloat16')
  if jax.default_backend() == 'cpu':
    assert report['mfu'] is None and 'no peak FLOP/s is listed' in report['mfu_note']
  assert common.device_peak('TPU v5 lite', 'bfloat16') == (197e12, None)
  assert common.device_peak('TPU v5', 'bfloat16') == (459e12, None)
  assert common.device_peak('NVIDIA H100 PCIe', 'float32') == (378e12, None)
  peak, note = common.device_peak('TPU v4', 'float32')
  assert peak is None and 'no float32 peak' in note


def test_bench_command_offers_only_modules_with_a_run():
  from visgen_jax.bench import __main__ as command  # pylint: disable=g-import-not-at-top
  names = set(command.bench_names())
  assert {'adm', 'diffusionrig', 'proposals', 'samplers'} <= names
  assert not names & {'common', 'oracles', 'gen2res_toy'}
  assert command.main(['bench', 'common']) == 2
