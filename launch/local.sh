#!/usr/bin/env bash
# Sets up ./.venv and runs one experiment on this machine, e.g.
#   bash launch/local.sh configs/adm_ffhq256.py:tiny /tmp/adm_tiny [--mode=sample] [--config.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:?usage: launch/local.sh CONFIG[:variant] WORKDIR [flags...]}"
workdir="${2:?usage: launch/local.sh CONFIG[:variant] WORKDIR [flags...]}"
shift 2
source launch/setup.sh
python -m visgen_jax.main --config="$config" --workdir="$workdir" "$@"
