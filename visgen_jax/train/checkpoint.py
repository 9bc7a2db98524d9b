"""Orbax checkpoints of the train state and the data iterator's position.

Orbax writes each step into a temporary directory and renames it when complete,
so a write cut short (SIGKILL, pre-emption) never looks like a checkpoint: the
manager only lists finished steps, and `cleanup_tmp_directories` removes leftovers.
"""

import os

import jax
import orbax.checkpoint as ocp

from visgen_jax.train import sharding


class Checkpointer:

  def __init__(self, directory: str, keep: int):
    self._manager = ocp.CheckpointManager(
        directory,
        item_names=('state', 'data'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True),
    )

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict):
    """Starts an asynchronous save; training goes on while it is written."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings that `abstract_state`'s ShapeDtypeStructs carry."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)



def _latest_state(directory: str):
  """(path of the latest finished checkpoint's state, its step), or None."""
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory, item_names=('state', 'data'))
  step = manager.latest_step()
  manager.close()
  return None if step is None else (os.path.join(directory, str(step), 'state'), step)


def latest_step(directory: str):
  """The latest finished checkpoint's step under `directory`, None when there is none; creates nothing."""
  latest = _latest_state(directory)
  return None if latest is None else latest[1]


def _restore_on_first_device(path: str):
  """The tree saved at `path` (a StandardCheckpointer directory), as saved, on this process's first device."""
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata)
  tree = checkpointer.restore(path, abstract)
  checkpointer.close()
  return tree


def saved_state_shapes(directory: str):
  """{'/'-joined path: shape} of the latest finished checkpoint's state under
  `directory`, from its metadata alone."""
  path, _ = _latest_state(directory)
  metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
  return {sharding.path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(metadata)[0]}


def restore_latest_state(directory: str):
  """The state of the latest finished checkpoint under `directory`, restored as
  saved onto this process's first device; None when there is none."""
  latest = _latest_state(directory)
  return None if latest is None else _restore_on_first_device(latest[0])


def restore_params_dir(path: str):
  """A parameter directory written by `python -m visgen_jax.convert`."""
  return _restore_on_first_device(path)
