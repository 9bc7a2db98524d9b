"""Orbax checkpoints of the train state and the data iterator's position.

Orbax writes each step into a temporary directory and renames it when complete,
so a write cut short (SIGKILL, pre-emption) never looks like a checkpoint: the
manager only lists finished steps, and `cleanup_tmp_directories` removes leftovers.
"""

import os

import jax
import orbax.checkpoint as ocp
from etils import epath

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



def latest_step(directory: str):
  """The latest finished checkpoint's step under `directory`, None when there is none.

  From the directory listing alone (Orbax renames a step's directory to its number
  when the step is complete): no CheckpointManager, whose construction is a barrier
  across processes, and nothing created.
  """
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(directory) else []
  return max(steps, default=None)


def _restore_on_first_device(path: str):
  """The tree saved at `path` (a StandardCheckpointHandler directory), as saved, on this process's first device."""
  handler = ocp.StandardCheckpointHandler()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          handler.metadata(epath.Path(path)).tree)
  return handler.restore(epath.Path(path), args=ocp.args.StandardRestore(abstract))


def _latest_state_path(directory: str):
  step = latest_step(directory)
  return None if step is None else os.path.join(directory, str(step), 'state')


def saved_state_shapes(directory: str):
  """{'/'-joined path: shape} of the latest finished checkpoint's state under
  `directory`, from its metadata alone."""
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(_latest_state_path(directory))).tree
  return {sharding.path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(metadata)[0]}


def restore_latest_state(directory: str):
  """The state of the latest finished checkpoint under `directory`, restored as
  saved onto this process's first device; None when there is none."""
  path = _latest_state_path(directory)
  return None if path is None else _restore_on_first_device(path)


def restore_params_dir(path: str):
  """A parameter directory written by `python -m visgen_jax.convert`."""
  return _restore_on_first_device(path)
