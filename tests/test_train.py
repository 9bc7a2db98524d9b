"""The trainer end to end through the CLI: resume after kill -9, interrupted
checkpoints, 8 simulated devices (data parallel and FSDP), 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import ROOT, run_distributed, run_main

# The tiny ADM config made smaller still: these tests are about the loop, not the model.
SMALL = ['--config=configs/adm_ffhq256.py:tiny', '--config.data.resolution=16',
         '--config.model.image_size=16', '--config.model.channel_mult=1', '--config.batch_size=8',
         '--config.sample_every=0', '--config.log_every=1', '--config.ckpt_every=3']
TOTAL = 12


def final_state(workdir, step=None):
  """(step, state) of the latest (or given) checkpoint, onto this process's one device."""
  directory = os.path.join(workdir, 'checkpoints')
  step = max(int(d) for d in os.listdir(directory) if d.isdigit()) if step is None else step
  path = os.path.join(directory, str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata)
  return step, checkpointer.restore(path, abstract)


def leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  la, lb = leaves(a), leaves(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    if rtol == atol == 0.0:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=str(path))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  run_main(*SMALL, f'--workdir={workdir}', f'--config.total_steps={TOTAL}',
           f'--config.sample_every={TOTAL}', check=True)
  return workdir


def test_run_writes_metrics_tensorboard_samples_and_checkpoints(uninterrupted):
  records = [json.loads(l) for l in open(uninterrupted / 'metrics.jsonl')]
  assert [r['step'] for r in records] == list(range(1, TOTAL + 1))
  for key in ('loss', 'grad_norm', 'learning_rate', 'images_per_sec', 'step_time'):
    assert all(np.isfinite(r[key]) for r in records), key
  assert os.listdir(uninterrupted / 'tensorboard')
  assert (uninterrupted / 'samples' / f'step_{TOTAL:07d}.png').is_file()
  steps = sorted(int(d) for d in os.listdir(uninterrupted / 'checkpoints') if d.isdigit())
  assert steps == [6, 9, 12]  # keep_checkpoints = 3


def test_resume_after_sigkill_equals_uninterrupted_bit_for_bit(uninterrupted, tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  args = [*SMALL, f'--workdir={tmp_path}', f'--config.total_steps={TOTAL}', f'--config.sample_every={TOTAL}']
  proc = subprocess.Popen([sys.executable, '-m', 'visgen_jax.main', *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = tmp_path / 'checkpoints'
  deadline = time.time() + 300
  while not (checkpoints.is_dir() and any(d.isdigit() and int(d) >= 3 for d in os.listdir(checkpoints))):
    assert proc.poll() is None and time.time() < deadline, 'run ended before its first checkpoint'
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert killed_at < TOTAL, 'the run finished before it was killed: the test proved nothing'

  resumed = run_main(*args, check=True)
  assert f'Resumed from step {killed_at}' in resumed.stderr + resumed.stdout
  step_a, state_a = final_state(uninterrupted)
  step_b, state_b = final_state(tmp_path)
  assert step_a == step_b == TOTAL
  assert_trees_equal(state_a, state_b)
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  reference = {r['step']: r['loss'] for r in map(json.loads, open(uninterrupted / 'metrics.jsonl'))}
  assert all(r['loss'] == reference[r['step']] for r in records)  # same batches, same noise


def test_interrupted_checkpoint_write_is_never_restored(uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  subprocess.run(['cp', '-r', str(uninterrupted), str(workdir)], check=True)
  # What a write cut short leaves behind: a temporary directory for a later step.
  partial = workdir / 'checkpoints' / f'{TOTAL + 3}.orbax-checkpoint-tmp-1234'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'garbage').write_bytes(b'\0' * 10)
  result = run_main(*SMALL, f'--workdir={workdir}', f'--config.total_steps={TOTAL + 3}', check=True)
  assert f'Resumed from step {TOTAL}' in result.stderr + result.stdout
  assert final_state(workdir)[0] == TOTAL + 3


# Multi-device and multi-process runs stop at step 6 and compare with the one-device
# run's checkpoint at step 6 (constant learning rate: the trajectory does not
# depend on total_steps). Not bit for bit: the batch mean is reduced across
# devices in another order.
def test_eight_devices_data_and_fsdp_match_one_device(uninterrupted, tmp_path):
  # One mesh covers both: the batch split over data x fsdp, parameters split over fsdp.
  run_main(*SMALL, f'--workdir={tmp_path}', '--config.total_steps=6', '--config.mesh.data=4',
           '--config.mesh.fsdp=2', devices=8, check=True)
  assert_trees_equal(final_state(uninterrupted, 6)[1]['params'], final_state(tmp_path)[1]['params'],
                     rtol=1e-5, atol=1e-6)


def test_two_processes_match_one_process(uninterrupted, tmp_path):
  run_distributed(*SMALL, '--config.total_steps=6', f'--workdir={tmp_path}')
  assert_trees_equal(final_state(uninterrupted, 6)[1]['params'], final_state(tmp_path)[1]['params'],
                     rtol=1e-5, atol=1e-6)
