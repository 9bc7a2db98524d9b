"""Orbax checkpoints of the train state and the data iterator's position.

Orbax writes each step into a temporary directory and renames it when complete,
so a write cut short (SIGKILL, pre-emption) never looks like a checkpoint: the
manager only lists finished steps, and `cleanup_tmp_directories` removes leftovers.
"""

import os

import jax
import orbax.checkpoint as ocp


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
  """(path of the latest finished checkpoint's state, StandardCheckpointer), or None."""
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory, item_names=('state', 'data'))
  step = manager.latest_step()
  manager.close()
  return None if step is None else (os.path.join(directory, str(step), 'state'), ocp.StandardCheckpointer())


def latest_params_shapes(directory: str, ema: bool):
  """The shapes (a tree of tuples) of the parameters `restore_latest_params`
  would return, read from the metadata alone; None when there is no checkpoint."""
  latest = _latest_state(directory)
  if latest is None:
    return None
  path, checkpointer = latest
  tree = checkpointer.metadata(path).item_metadata['ema_params' if ema else 'params']
  return jax.tree.map(lambda m: tuple(m.shape), tree)


def restore_latest_params(directory: str, ema: bool):
  """The parameters (EMA when `ema`) of the latest finished checkpoint under
  `directory`, restored as saved onto this process's first device; None when
  there is none. For loading another run's weights (a first training stage)."""
  latest = _latest_state(directory)
  if latest is None:
    return None
  path, checkpointer = latest
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata)
  state = checkpointer.restore(path, abstract)
  checkpointer.close()
  return state['ema_params' if ema else 'params']
