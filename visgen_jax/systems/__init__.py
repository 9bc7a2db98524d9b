"""One thin recipe per system: model + loss + sampler. Nothing generic lives here.

A recipe module has `validate(config)`, every check of the config that needs
no built object (UserError sentences naming the key; nothing is built, no
device is touched), and `make(config) -> System`, which only wires. The core
calls `validate` before anything is built or written; the trainer knows only
`System`.
"""

import dataclasses
import importlib
from typing import Any, Callable, Optional

from visgen_jax.errors import UserError

RECIPES = ('adm', 'patchdm', 'maskclip', 'diffusionrig', 'gen2res', 'proposals')


@dataclasses.dataclass(frozen=True)
class System:
  # (key, batch) -> params. `batch` is the first global batch (for shapes).
  init: Callable[[Any, dict], Any]
  # (params, batch, key) -> (scalar loss, dict of scalar metrics); training mode. With
  # state_keys: (loss, metrics, {key: the new values of params[key]}) for each state key.
  loss_fn: Callable[[Any, dict, Any], tuple]
  # (params, key) -> config.sample.num images [N, H, W, 3] in [-1, 1]; None if the system only trains.
  sample: Optional[Callable[[Any, Any], Any]] = None
  # Extra --mode=NAME commands (e.g. outpaint, segment): NAME -> fn(params, key, workdir),
  # run on the latest checkpoint's parameters (EMA when config.sample.use_ema).
  commands: dict = dataclasses.field(default_factory=dict)
  # Weight sources the system always starts from, in config.init_from's format
  # (visgen_jax/train/weights.py), applied before config.init_from on a fresh start.
  init_from: tuple = ()
  # A computed start (e.g. a code table from CLIP embeddings of the training images):
  # params -> params; leaves returned as other objects replace the initial ones (in
  # params and EMA). Fresh starts only, after init_from, on the host, on every process
  # (each must return the same values). Weights read from files go through init_from.
  load_pretrained: Optional[Callable[[Any], Any]] = None
  # (params, class names) -> predict(example) -> (class logits [M, C+1], mask logits [M, h, w]):
  # one example of the system's segmentation data (data/segmentation.py: image, proposals,
  # proposal_valid, valid_hw) classified against the vocabulary (class C = no object), its valid
  # proposals only, cropped to valid_hw. Used by the 'segmentation' evaluator (visgen_jax/eval);
  # None if the system does not segment.
  segmenter: Optional[Callable[[Any, Any], Callable[[dict], tuple]]] = None
  # params -> propose(image uint8 [H, W, 3], where) -> data.segmentation.records.Proposals: class-
  # agnostic mask proposals (systems/proposals.make_proposer). Used by the 'proposal_recall'
  # evaluator; None if the system does not propose masks.
  proposer: Optional[Callable[[Any], Callable]] = None
  # Top-level params keys that hold model state the forward pass updates (e.g.
  # 'batch_stats'): not trained, no EMA; see visgen_jax/train/trainer.py.
  state_keys: tuple = ()
  # False when loss_fn ignores its batch (Patch-DM's second stage on a code table): the
  # trainer then reads no data and passes zeros shaped like a batch.
  reads_batch: bool = True


def _recipe(config):
  if config.system not in RECIPES:
    raise UserError(f'config.system={config.system!r} is not a known system; allowed: {", ".join(RECIPES)}.')
  return importlib.import_module(f'visgen_jax.systems.{config.system}')


def validate(config):
  """The checks of config.system's recipe; UserError on the first mistake."""
  _recipe(config).validate(config)


def get_system(config) -> System:
  """The validated config's system."""
  recipe = _recipe(config)
  recipe.validate(config)
  return recipe.make(config)


def run_command(config, workdir: str, mode: str, core):
  """--mode=MODE (not train): through the recipe's own run_command(config, workdir, mode, core) if it
  has one (for commands that run before the workdir holds a checkpoint, e.g. Gen2Res's album), else
  through the core's. `core` is the trainer (its train and run_command): passed in, so that recipes
  stay below it."""
  recipe = _recipe(config)
  if hasattr(recipe, 'run_command'):
    recipe.run_command(config, workdir, mode, core)
  else:
    core.run_command(config, workdir, mode)
