#!/usr/bin/env bash
# Creates ./.venv with visgen_jax (CPU JAX) installed; `--tests` adds pytest and the
# CPU PyTorch parity oracles. Safe to re-run: an existing .venv is reused.
# Source it (`source launch/setup.sh`) to get the venv activated.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
pip_install() { "$venv/bin/pip" install -q --disable-pip-version-check "$@"; }
pip_install -e "$root"
# CLIP's BPE merges file (MaskCLIP's tokenizer) ships inside open_clip_torch; its dependencies
# (torch, torchvision, timm) are not needed for that and would pull a CUDA build: skip them.
pip_install --no-deps open_clip_torch==3.3.0
if [ "${1:-}" = "--tests" ]; then
  # torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel.
  pip_install torch==2.13.0
  # transformers (Mask2Former parity oracle) does not depend on torch: it runs on the CPU torch above.
  pip_install transformers==5.24.0
  pip_install -e "$root[test,parity]"
  # open_clip (CLIP parity oracle) depends on torchvision and timm, whose registry builds pull a CUDA
  # torch: take them without dependencies (tests/helpers.py makes torchvision import beside CPU torch).
  pip_install --no-deps torchvision==0.29.1
  # pytorch-fid (FID Inception parity oracle): with its dependencies, pip would replace the CPU torch
  # by a CUDA build to satisfy this torchvision; what it needs (numpy, pillow, scipy) is here already.
  pip_install --no-deps pytorch-fid==0.3.0
fi
export PATH="$venv/bin:$PATH"
