"""XLA flags the project sets by default, each only when the user's XLA_FLAGS does not name it.

`visgen_jax/__init__.py` applies them on import, so they take effect when JAX starts its
backends afterwards (XLA reads XLA_FLAGS once, at the first computation); a process that ran
JAX before importing visgen_jax keeps XLA's own defaults. Each was measured with the benches
(`python -m visgen_jax.bench adm`, `maskclip`) on the jaxlib minor version in `MEASURED_ON` and is
applied only there, since experimental flags come and go (an unknown flag aborts XLA).
"""

import importlib.metadata
import os

MEASURED_ON = '0.10.'
CPU_DEFAULTS = {
    # XLA hands dots to YNNPACK by default; the project hands it reductions instead. Dots: on an
    # AVX-512 core YNNPACK's f32 matmuls ran ~20 % below XLA's own (Eigen) kernels, which match
    # PyTorch (CLIP's 788×768×3072 MLP matmul: 145 vs 180 GFLOP/s, torch 184). Reductions:
    # YNNPACK's per-channel sums (norm statistics, bias gradients) ran 2-4x faster than XLA's
    # loops; the bench ADM's training step 1.46 → 1.23 s (torch 1.0 s). Convolutions stay with
    # Eigen: YNNPACK's filter gradients (a window as large as the image) ran 2-4x slower, that
    # step took 1.98 s with them.
    'xla_cpu_experimental_ynn_fusion_type': 'reduce',
}


def apply_defaults(environ=os.environ) -> None:
  """Append to environ['XLA_FLAGS'] every default flag it does not already name."""
  try:
    jaxlib_version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return
  if not jaxlib_version.startswith(MEASURED_ON):
    return
  flags = environ.get('XLA_FLAGS', '')
  missing = [flag for name, flag in _defaults() if f'--{name}=' not in flags]
  if missing:
    environ['XLA_FLAGS'] = ' '.join([flags, *missing]).strip()


def without_defaults(flags: str) -> str:
  """XLA_FLAGS `flags` without the project's defaults (for benches comparing with XLA's own)."""
  ours = {flag for _, flag in _defaults()}
  return ' '.join(flag for flag in flags.split() if flag not in ours)


def _defaults():
  return [(name, f'--{name}={value}') for name, value in CPU_DEFAULTS.items()]
