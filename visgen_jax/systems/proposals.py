"""Mask proposals: MaskCLIP's class-agnostic proposal network (Mask2Former with a ResNet-50,
visgen_jax.models.mask2former), trained and run on the segmentation data sources.

Training (Mask2Former's COCO recipe): every ground-truth segment, thing or stuff, is one
"object" target (class 0); Hungarian matching and 2·CE + 5·BCE + 5·dice on importance-sampled
points (visgen_jax.segmentation.losses) on the initial queries' and every decoder layer's
prediction, class term included (deep supervision). Images enter as RGB 0–255 (the network
normalises them); the data source's padding (0 in [-1, 1]) is mid-grey, close to the pixel mean.

A proposal's object score is 1 − p(no object), so a network with more classes proposes the same
way; MaskCLIP's released network has no class head (the converter zero-fills it): every query
scores 0.5 and the proposals are the first top-k queries, all 100 by default, as MaskCLIP uses them. At inference an image's
longer side is resized to the input size (padded bottom / right to a square), the top-k masks by
object score above a threshold are upsampled to the padded input, cropped to the image and
resized to its own size (Mask2Former's sem_seg_postprocess).

Command (on the latest checkpoint):
  --mode=propose [--config.propose.out=DIR]
    → one <image_id>.npz per image of config.data (the proposals format of
      visgen_jax/data/segmentation/records.py: masks [K, H, W] bool, or float16 logits with
      propose.logits, and scores [K]), K ≤ propose.topk; default DIR:
      WORKDIR/proposals/<dataset directory name>-step<N>. Each process writes its share
      (images p, p + P, ...), every file atomically; files already there are kept, so an
      interrupted run resumes. Build MaskCLIP's dataset with them:
      python data_prep/build_segmentation_dataset.py ... --proposals=DIR
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from visgen_jax import image_io
from visgen_jax.convert import mask2former as m2f_convert
from visgen_jax.data import folder
from visgen_jax.data import segmentation as seg_data
from visgen_jax.data.segmentation import records
from visgen_jax.errors import UserError
from visgen_jax.eval import process_local
from visgen_jax.models import resnet
from visgen_jax.models.mask2former import Mask2Former
from visgen_jax.segmentation import losses, results
from visgen_jax.systems import System
from visgen_jax.train import checkpoint, weights
from visgen_jax.train import config as config_lib

STRIDE = 32  # the backbone's: input sides must be multiples of it


def check_input_size(size: int, where: str):
  if size < STRIDE or size % STRIDE:
    raise UserError(f'{where}={size}: the proposal network reads square inputs whose side is a '
                    f'multiple of its stride {STRIDE} (e.g. 1024, 640, 64).')


def object_scores(class_logits):
  """[..., Q, C+1] → [..., Q]: 1 − p(no object)."""
  return 1.0 - jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., -1]


def to_network_input(images):
  """Batches' images in [-1, 1] → RGB 0–255, as the network takes them."""
  return (images + 1.0) * 127.5


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: Mask2Former, params, image):
  """Object scores [Q] and mask logits [Q, h, w] of one image [H, W, 3] (compiled once per network
  and shape, however many proposers are made: one per evaluation)."""
  class_logits, mask_logits = model.apply({'params': params}, image[None])[-1]
  return object_scores(class_logits[0]), mask_logits[0]


def make_proposer(model: Mask2Former, params, size: int, topk: int, score_threshold: float = 0.0):
  """propose(image uint8 [H, W, 3], where) → records.Proposals: float32 mask logits [K, H, W] at
  the image's size and object scores [K], best first; the top `topk` with a score above
  `score_threshold` (K = 0 is a defined empty result). `where` names the image's setting in
  errors."""
  check_input_size(size, 'the proposal input size')

  def propose(image, where: str):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise UserError(f'{where}: the proposal network needs an RGB image (uint8 [H, W, 3]), got '
                      f'{image.dtype} {image.shape}.')
    height, width = image.shape[:2]
    nothing = records.Proposals(np.zeros((0, height, width), bool), None)
    example = seg_data.inference_example(Image.fromarray(image), nothing, size, 1)
    h, w = example['valid_hw']
    if min(h, w) < STRIDE:
      raise UserError(f'{where}: the {width}x{height} image becomes {w}x{h} at the proposal '
                      f'input size {size}; its shorter side must reach the backbone stride '
                      f'{STRIDE} (crop it nearer to square or raise the input size).')
    scores, masks = jax.device_get(_forward(model, params, jnp.asarray(to_network_input(example['image']))))
    order = np.argsort(-scores, kind='stable')[:topk]
    order = order[scores[order] > score_threshold]
    masks = results.resize_logits(masks[order], (size, size))[:, :h, :w]
    return records.Proposals(results.resize_logits(masks, (height, width)), scores[order])

  return propose


def check_checkpoint_path(path: str, where: str):
  if not os.path.exists(os.path.expanduser(path)):
    raise UserError(f'{where}={path!r}: no such proposals workdir, converted directory or checkpoint file.')


def load_network(path: str, where: str, config):
  """(Mask2Former, params) of a proposals workdir (its latest checkpoint; fields from its
  config.json), a directory written by `python -m visgen_jax.convert --kind=mask2former` or a
  detectron2 checkpoint file (fields read off the weights, 8 heads); UserError naming `where`
  when it is none of these. `config` is the calling run's (for weights.read_source)."""
  check_checkpoint_path(path, where)
  path = os.path.abspath(os.path.expanduser(path))
  saved = config_lib.saved_config(path)
  num_heads, use_ema = Mask2Former.num_heads, False
  if saved:
    num_heads, use_ema = saved['model']['num_heads'], saved['sample']['use_ema']
  flat = weights.read_source({'path': path, 'use_ema': use_ema, 'where': where}, config)
  fields, params, _ = m2f_convert.network_from_params(flat, num_heads, f'{where}={path!r}')
  return Mask2Former(**fields), params


def load_proposer(path: str, where: str, size: int, topk: int, config):
  """make_proposer of the network load_network reads from `path`."""
  model, params = load_network(path, where, config)
  return make_proposer(model, jax.device_put(params), size, topk)


def validate(config):
  size, width = folder.parse_resolution(config.data.resolution, 'data.resolution')
  if size != width:
    raise UserError(f'config.data.resolution={config.data.resolution}: the proposal network trains '
                    'on square crops; give one int.')
  check_input_size(size, 'config.data.resolution')
  if config.model.num_classes != 1:
    raise UserError(f'config.model.num_classes={config.model.num_classes}: proposals are '
                    'class-agnostic, every segment is one "object" class; use 1.')
  config_lib.check_choice(config, 'model.backbone_depth', tuple(resnet.BLOCKS))
  p = config.propose
  if p.topk < 1:
    raise UserError(f'config.propose.topk={p.topk}: keep at least 1 proposal per image.')
  if not 0.0 <= p.score_threshold < 1.0:
    raise UserError(f'config.propose.score_threshold={p.score_threshold}: an object probability '
                    'in [0, 1).')


def make(config) -> System:
  model = Mask2Former(**config.model)
  loss_options = dict(config.loss)

  def init(key, batch):
    return model.init(key, to_network_input(batch['image'][:1]))['params']

  def loss_fn(params, batch, key):
    outputs = model.apply({'params': params}, to_network_input(batch['image']), train=True)
    # Every segment is an "object": class 0.
    targets = (batch['target_masks'], jnp.zeros_like(batch['target_classes']), batch['target_valid'])
    return losses.set_criterion(outputs, targets, key, num_classes=1, aux_class_loss=True,
                                **loss_options)

  def propose(params, key, workdir):
    del key  # inference is deterministic
    write_proposals(config, proposer(process_local(params)), workdir)

  def proposer(params):
    size = folder.parse_resolution(config.data.resolution, 'data.resolution')[0]
    return make_proposer(model, params, size, config.propose.topk, config.propose.score_threshold)

  return System(init=init, loss_fn=loss_fn, commands={'propose': propose}, proposer=proposer)


def write_proposals(config, propose, workdir: str):
  """--mode=propose: this process's share of config.data's images, proposed by `propose`
  (make_proposer's), as <image_id>.npz files."""
  source, info = seg_data.make_segmentation_source(config.data)
  p = config.propose
  step = checkpoint.latest_step(os.path.join(workdir, 'checkpoints'))
  out = p.out or os.path.join(workdir, 'proposals', f'{os.path.basename(info.path)}-step{step}')
  mine = range(jax.process_index(), info.num_examples, jax.process_count())
  written = kept = empty = 0
  for i in tqdm(mine, desc='propose', unit='image', disable=jax.process_index() != 0):
    raw = source[i]
    image_id = raw['image_id'].decode() if isinstance(raw['image_id'], bytes) else str(raw['image_id'])
    path = os.path.join(out, f'{image_id}.npz')
    if os.path.isfile(path):
      kept += 1
      continue
    image = records.decode_image(raw['image'])
    masks, scores = propose(image, f'{info.path} record {i} ({image_id})')
    masks = masks.astype(np.float16) if p.logits else masks > 0
    image_io.write_atomically(path, lambda tmp: records.save_proposals(tmp, masks, scores))
    written += 1
    empty += len(scores) == 0
  print(json.dumps({'proposals': out, 'process': jax.process_index(), 'written': written,
                    'already_there': kept, 'without_proposals': empty}), flush=True)
