#!/usr/bin/env bash
# Runs an experiment on every worker of a Cloud TPU pod slice (TPU VM).
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a bash launch/tpu_pod.sh configs/adm_ffhq256.py gs://bucket/runs/adm [--config.key=value ...]
# The repo must be at ~/visgen_jax on every worker (e.g. `--command "git clone ..."` first).
# jax.distributed.initialize() finds the other workers by itself on TPU VMs; each process
# reads its shard of the data, and the workdir must be shared (a gs:// bucket).
set -euo pipefail
config="${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [flags...]}"
workdir="${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [flags...]}"
shift 2
gcloud compute tpus tpu-vm ssh "${TPU_NAME:?set TPU_NAME}" --zone="${ZONE:?set ZONE}" --worker=all --command "
  cd ~/visgen_jax && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]' &&
  .venv/bin/python -m visgen_jax.main --distributed --config=$config --workdir=$workdir $*"
