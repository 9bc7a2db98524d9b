#!/usr/bin/env bash
# Sets up ./.venv (CPU JAX, pytest, PyTorch parity oracles) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh --tests
python -m pytest -n 2 -q --durations=15 tests "$@"
