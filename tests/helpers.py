"""Running the CLI in a subprocess, as users do."""

import os
import subprocess
import sys

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


def import_open_clip():
  """open_clip_torch, or skip the test when the parity extras are absent.

  torchvision's registry wheel is built against a newer torch than the CPU one we pin;
  its compiled ops fail to register, so their schemas are declared first (only the
  pure-Python parts of torchvision are used by open_clip).
  """
  import pytest
  torch = pytest.importorskip('torch')
  try:
    library = torch.library.Library('torchvision', 'DEF')
    library.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    library.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    import_open_clip.library = library  # keep the registration alive
  except RuntimeError:
    pass  # already defined by an earlier call in this process
  return pytest.importorskip('open_clip')
