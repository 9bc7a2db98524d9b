"""Running the CLI in a subprocess, as users do; random weights without an init compile."""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.bench import oracles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, devices=1, env=None, timeout=600, check=False):
  """python -m visgen_jax.main ARGS with `devices` simulated CPU devices."""
  full_env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
                  JAX_PLATFORMS='cpu', **(env or {}))
  result = subprocess.run([sys.executable, '-m', 'visgen_jax.main', *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f'exit {result.returncode}\n{result.stderr[-4000:]}')
  return result


def run_distributed(*args, processes=2, timeout=600):
  """`processes` CLI processes (one CPU device each) of one distributed run on localhost; each's
  (stdout, stderr), after checking that all exited with 0."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'visgen_jax.main', *args, '--distributed', f'--coordinator_address=localhost:{port}',
       f'--num_processes={processes}', f'--process_id={i}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]
  outputs = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  return outputs


def import_open_clip():
  """open_clip_torch (imported as visgen_jax.bench.oracles does), or skip when it is absent."""
  import pytest
  pytest.importorskip('torch')
  oracles.declare_torchvision_ops()
  return pytest.importorskip('open_clip')


def random_params(shapes, seed=1):
  """Random weights of the given shapes (no init compile; and zero-initialised
  output convs would make every output 0)."""
  paths, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  leaves = [(1.0 if 'scale' in jax.tree_util.keystr(path) else 0.0) + 0.1 * rng.normal(size=leaf.shape)
            for path, leaf in paths]
  return tree.unflatten([jnp.asarray(l, jnp.float32) for l in leaves])
