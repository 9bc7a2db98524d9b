"""MaskCLIP: a frozen CLIP ViT classifies mask proposals against any text
vocabulary with mask class tokens; Relative Mask Attention (RMA) refines the
masks. Only RMA's added parameters train.

Parameters: {'clip': the vision tower (frozen; converted from
model.clip_checkpoint, random without one), 'rma': RMA's layers}. The text
tower runs once per vocabulary on the host: class embeddings are
CLIP(text prompt) averaged over model.prompt_templates and L2-normalised, and
a mask's class logits are cos(mask embedding, class embedding) / temperature
(0.01, the public code's). The vocabulary is the class names plus
model.no_object_name ('other'), whose embedding is the "no object" class of
the set criterion, in training and at inference alike (the public code
appends it only for training; we keep one rule so the learnt "no object"
logit means the same thing at test time).

Training (the public code's recipe): proposals (stored per image, or the
ground-truth masks) go in as mask logits; every RMA layer's refined masks
are supervised (deep supervision) with Hungarian matching and 2·CE + 5·BCE +
5·dice on sampled points (visgen_jax.segmentation.losses).

Commands (on the latest checkpoint):
  --mode=segment --config.classes="toy rabbit,real rabbit,background" \\
      --config.image=PATH [--config.proposals=PATH.npz]
    → WORKDIR/segment/<image name>/: overlay.png, masks/<class>.png (semantic),
      panoptic.png + panoptic.json (COCO panoptic), written atomically.

Proposals come from config.proposals, else from the proposal network of
model.proposal_checkpoint (a proposals workdir, a directory written by
`python -m visgen_jax.convert --kind=mask2former`, or the released .pth; see
visgen_jax/systems/proposals.py), run at model.proposal_resolution, its top
data.max_proposals masks. With a proposal checkpoint, --mode=eval takes the
network's proposals too (on the image as the evaluator reads it) unless
data.proposals is 'stored' or 'gt'.

Evaluation: `segmenter` feeds the 'segmentation' evaluator (visgen_jax/eval), configured in
config.evals.seg: --mode=eval [--config.evals.seg.path=DATASET] → mIoU, PQ/SQ/RQ, mask AP.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from visgen_jax import image_io
from visgen_jax.convert.clip import load_clip_checkpoint
from visgen_jax.data import folder
from visgen_jax.data import segmentation as seg_data
from visgen_jax.errors import UserError, for_setting
from visgen_jax.models import clip as clip_lib
from visgen_jax.models.maskclip import MaskCLIP, check_rma_layers, class_embeddings, class_logits
from visgen_jax.nn.attention import IMPLS
from visgen_jax.segmentation import losses, results
from visgen_jax.systems import System, proposals as proposals_lib
from visgen_jax.text import tokenizer as tokenizer_lib
from visgen_jax.train import config as config_lib

# The random CLIP used without a checkpoint is drawn from this key, so every
# command of a run (train, segment, eval) sees the same text tower.
RANDOM_CLIP_SEED = 0


def parse_classes(text: str, where: str) -> list[str]:
  """A comma-separated vocabulary; empty or duplicate names are UserErrors."""
  names = [name.strip() for name in text.split(',')] if text.strip() else []
  if not names or not all(names):
    raise UserError(f'{where}={text!r}: give a comma-separated list of class names, none empty.')
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f'{where} lists {", ".join(duplicates)} more than once; class names must be unique.')
  return names


def merges_path(model_config) -> str:
  """model.merges, else the file beside model.clip_checkpoint, else open_clip's packaged copy."""
  if model_config.merges:
    return model_config.merges
  if model_config.clip_checkpoint:
    return tokenizer_lib.find_merges_file(model_config.clip_checkpoint)
  found = tokenizer_lib.installed_merges_file()
  if found is None:
    raise UserError('config.model.merges is empty and no CLIP BPE merges file was found (none beside '
                    'model.clip_checkpoint, no open_clip_torch package installed); pass '
                    '--config.model.merges=PATH/bpe_simple_vocab_16e6.txt.gz.')
  return found


def load_clip(model_config):
  """(CLIP module, {'visual', 'text', 'logit_scale'} params): converted from
  model.clip_checkpoint, or random (RANDOM_CLIP_SEED) without one."""
  if model_config.clip_checkpoint:
    config, params = load_clip_checkpoint(model_config.clip_checkpoint, model_config.clip_preset)
    return clip_lib.clip_model(config), params
  model = clip_lib.clip_model(model_config.clip_preset)
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, model.visual.image_size, model.visual.image_size, 3)),
                                        jnp.zeros((1, 77), jnp.int32))['params'])(jax.random.key(RANDOM_CLIP_SEED))
  return model, jax.device_get(params)


def text_embeddings(model_config, clip_model, clip_params, names) -> np.ndarray:
  """[len(names) + 1, embed_dim] unit vectors: each name's prompts' mean, then 'no object'."""
  tokenizer = tokenizer_lib.Tokenizer(merges_path(model_config))
  return class_embeddings(clip_model, clip_params, tokenizer, list(names) + [model_config.no_object_name],
                          tuple(model_config.prompt_templates))


def validate(config):
  m = config.model
  config_lib.check_choice(config, 'model.clip_preset', clip_lib.CLIP_PRESETS)
  config_lib.check_choice(config, 'model.attention_impl', IMPLS)
  if not tuple(m.prompt_templates) or not all('{}' in t for t in m.prompt_templates):
    raise UserError(f'config.model.prompt_templates={tuple(m.prompt_templates)} must be non-empty, each '
                    'with one {} where the class name goes.')
  if m.clip_checkpoint and not os.path.isfile(m.clip_checkpoint):
    raise UserError(f'config.model.clip_checkpoint={m.clip_checkpoint!r}: no such file.')
  merges_path(m)
  tower = clip_lib.vision_tower(m.clip_preset)
  if m.use_rma:
    with for_setting('config.model'):
      check_rma_layers(m.rma_layers, tower.layers)
  size = folder.parse_resolution(config.data.resolution, 'data.resolution')[0]
  with for_setting('config.data.resolution'):
    tower.grid((1, size, size, 3))
  if m.proposal_checkpoint:
    proposals_lib.check_checkpoint_path(m.proposal_checkpoint, 'config.model.proposal_checkpoint')
    proposals_lib.check_input_size(m.proposal_resolution, 'config.model.proposal_resolution')


def make(config) -> System:
  m = config.model
  clip_model, clip_params = load_clip(m)
  vision = clip_model.visual.clone(attention_impl=m.attention_impl)
  model = MaskCLIP(clip=vision, rma_layers=tuple(m.rma_layers), use_rma=m.use_rma)
  _, info = seg_data.make_segmentation_source(config.data)
  train_text = jnp.asarray(text_embeddings(m, clip_model, clip_params, info.class_names))
  num_classes = len(info.class_names)
  loss_options = dict(config.loss)

  def init(key, batch):
    params = model.init(key, batch['image'][:1], batch['proposals'][:1])['params']
    # Placeholders (XLA drops their random init): CLIP's weights are put in before the first step.
    return dict(params, clip=jax.tree.map(jnp.zeros_like, params['clip']))

  # The vision tower from the checkpoint file (its text tower is read above), or the random
  # CLIP the text tower comes from.
  clip_weights = ({'path': m.clip_checkpoint, 'select': '^clip/', 'rename': ('^visual/', 'clip/')},)
  random_clip = lambda params: dict(params, clip=clip_params['visual'])

  def predict(params, images, proposals, text):
    """(class logits [B, M, C+1], mask logits [B, M, H, W]): the last RMA layer's masks, or the
    proposals themselves without RMA."""
    embeddings, refined = model.apply({'params': params}, images, proposals)
    return class_logits(embeddings, text, m.temperature), (refined[-1] if refined else proposals)

  def loss_fn(params, batch, key):
    if not m.use_rma:
      raise UserError('config.model.use_rma=false has no parameters to train (CLIP stays frozen); '
                      'use --mode=segment / --mode=eval, or set use_rma=true.')
    embeddings, refined = model.apply({'params': params}, batch['image'], batch['proposals'])
    logits = class_logits(embeddings, train_text, m.temperature)
    targets = (batch['target_masks'], batch['target_classes'], batch['target_valid'])
    return losses.set_criterion([(logits, masks) for masks in refined], targets, key,
                                num_classes=num_classes, **loss_options)

  predict_jit = jax.jit(predict)
  size = folder.parse_resolution(config.data.resolution, 'data.resolution')[0]

  @functools.cache
  def network_proposals():
    """The proposal network of model.proposal_checkpoint: image → Proposals."""
    return proposals_lib.load_proposer(m.proposal_checkpoint, 'config.model.proposal_checkpoint',
                                       m.proposal_resolution, config.data.max_proposals, config)

  def with_network_proposals(example):
    h, w = example['valid_hw']
    image = image_io.to_uint8(example['image'][:h, :w])
    found = network_proposals()(image, 'an evaluation image')
    return dict(example, **seg_data.inference_example(Image.fromarray(image), found, size,
                                                      config.data.max_proposals))

  def segmenter(params, names):
    text = jnp.asarray(text_embeddings(m, clip_model, clip_params, names))

    def predict(example):
      if m.proposal_checkpoint and config.data.proposals == 'auto':
        example = with_network_proposals(example)
      images = jnp.asarray(example['image'])[None]
      proposals = jnp.asarray(example['proposals'])[None]
      logits, masks = jax.device_get(predict_jit(params, images, proposals, text))
      valid = np.asarray(example['proposal_valid'], bool)
      h, w = example['valid_hw']
      return logits[0][valid], masks[0][valid][:, :h, :w]

    return predict

  def segment(params, key, workdir):
    del key  # inference is deterministic
    names, is_thing, image, proposals = segment_inputs(config)
    if proposals is None:
      proposals = network_proposals()(np.asarray(image), f'config.image={config.image!r}')
    example = seg_data.inference_example(image, proposals, size, config.data.max_proposals)
    logits, masks = segmenter(params, names)(example)
    masks = results.resize_logits(masks, (image.height, image.width))
    results.write_segmentation(workdir, config.image, np.asarray(image), names, is_thing, logits, masks,
                               config.inference)

  return System(init=init, loss_fn=loss_fn,
                init_from=clip_weights if m.clip_checkpoint else (),
                load_pretrained=None if m.clip_checkpoint else random_clip,
                commands={'segment': segment}, segmenter=segmenter)


def segment_inputs(config):
  """--mode=segment's checked inputs: (class names, is_thing per class, RGB image, proposals or
  None when the proposal network is to make them)."""
  names = parse_classes(config.classes, 'config.classes')
  stuff_text = config.inference.stuff_classes
  stuff = set(parse_classes(stuff_text, 'config.inference.stuff_classes') if stuff_text else [])
  unknown = sorted(stuff - set(names))
  if unknown:
    raise UserError(f'config.inference.stuff_classes names {", ".join(unknown)}, which is not in '
                    'config.classes.')
  if not config.image:
    raise UserError('--mode=segment needs --config.image=PATH (the image to segment).')
  image = Image.fromarray(image_io.read_rgb(config.image, 'config.image'))
  if not config.proposals and not config.model.proposal_checkpoint:
    raise UserError('--mode=segment needs --config.proposals=PATH.npz (mask proposals for the image; '
                    'format: visgen_jax/data/segmentation/records.py) or a proposal network, '
                    '--config.model.proposal_checkpoint=DIR.')
  proposals = (seg_data.load_proposals(config.proposals, (image.height, image.width))
               if config.proposals else None)  # None: the proposal network's
  return names, np.array([n not in stuff for n in names]), image, proposals
