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
      --config.image=PATH --config.proposals=PATH.npz
    → WORKDIR/segment/<image name>/: overlay.png, masks/<class>.png (semantic),
      panoptic.png + panoptic.json (COCO panoptic), written atomically.

Evaluation: `segmenter` feeds the 'segmentation' evaluator (visgen_jax/eval), configured in
config.evals.seg: --mode=eval [--config.evals.seg.path=DATASET] → mIoU, PQ/SQ/RQ, mask AP.
"""

import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from visgen_jax import image_io
from visgen_jax.convert.clip import load_clip_checkpoint
from visgen_jax.data import folder
from visgen_jax.data import segmentation as seg_data
from visgen_jax.errors import UserError
from visgen_jax.models import clip as clip_lib
from visgen_jax.models.maskclip import MaskCLIP
from visgen_jax.segmentation import losses, postprocess
from visgen_jax.systems import System
from visgen_jax.text import tokenizer as tokenizer_lib
from visgen_jax.train.config import base_config

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


def class_embeddings(model_config, clip_model, clip_params, names) -> np.ndarray:
  """[len(names) + 1, embed_dim] unit vectors: each name's prompts' mean, then 'no object'."""
  tokenizer = tokenizer_lib.Tokenizer(merges_path(model_config))
  templates = tuple(model_config.prompt_templates)
  vocabulary = list(names) + [model_config.no_object_name]
  prompts = [t.format(name) for name in vocabulary for t in templates]
  encode = jax.jit(lambda p, ids: clip_model.apply({'params': p}, ids, method='encode_text'))
  features = np.asarray(encode(clip_params, tokenizer(prompts)), np.float64)
  features /= np.linalg.norm(features, axis=-1, keepdims=True)
  features = features.reshape(len(vocabulary), len(templates), -1).mean(axis=1)
  return (features / np.linalg.norm(features, axis=-1, keepdims=True)).astype(np.float32)


def class_logits(embeddings, text, temperature):
  """cos(mask embedding, class embedding) / temperature: [B, M, E] x [C+1, E] → [B, M, C+1]."""
  embeddings = embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
  return jnp.einsum('bme,ce->bmc', embeddings, text) / temperature


def make(config) -> System:
  m = config.model
  if m.clip_preset not in clip_lib.CLIP_PRESETS:
    raise UserError(f'config.model.clip_preset={m.clip_preset!r} is unknown; allowed: '
                    f'{", ".join(clip_lib.CLIP_PRESETS)}.')
  if not tuple(m.prompt_templates) or not all('{}' in t for t in m.prompt_templates):
    raise UserError(f'config.model.prompt_templates={tuple(m.prompt_templates)} must be non-empty, each '
                    'with one {} where the class name goes.')
  clip_model, clip_params = load_clip(m)
  vision = clip_model.visual.clone(attention_impl=m.attention_impl)
  model = MaskCLIP(clip=vision, rma_layers=tuple(m.rma_layers), use_rma=m.use_rma)
  _, info = seg_data.make_segmentation_source(config.data)
  train_text = jnp.asarray(class_embeddings(m, clip_model, clip_params, info.class_names))
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

  def segmenter(params, names):
    text = jnp.asarray(class_embeddings(m, clip_model, clip_params, names))

    def predict(example):
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
    size = folder.parse_resolution(config.data.resolution, 'data.resolution')[0]
    example = seg_data.inference_example(image, proposals, size, config.data.max_proposals)
    logits, masks = segmenter(params, names)(example)
    masks = _resize_logits(masks, (image.height, image.width))
    write_segmentation(workdir, config.image, np.asarray(image), names, is_thing, logits, masks,
                       config.inference)

  return System(init=init, loss_fn=loss_fn,
                init_from=clip_weights if m.clip_checkpoint else (),
                load_pretrained=None if m.clip_checkpoint else random_clip,
                commands={'segment': segment}, segmenter=segmenter)


def segment_inputs(config):
  """--mode=segment's checked inputs: (class names, is_thing per class, RGB image, proposals)."""
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
  if not config.proposals:
    raise UserError('--mode=segment needs --config.proposals=PATH.npz (mask proposals for the image; '
                    'format: visgen_jax/data/segmentation/records.py).')
  proposals = seg_data.load_proposals(config.proposals, (image.height, image.width))
  return names, np.array([n not in stuff for n in names]), image, proposals


def _resize_logits(masks, hw):
  """[M, h, w] mask logits bilinearly resized to hw = (H, W)."""
  if masks.shape[0] == 0:
    return np.zeros((0, *hw), np.float32)
  return np.asarray(jax.image.resize(jnp.asarray(masks), (masks.shape[0], *hw), 'linear'))


def write_segmentation(workdir, image_path, image, names, is_thing, logits, masks, options):
  """overlay.png, masks/<class>.png, panoptic.png + panoptic.json for one image, all or nothing,
  from process 0 only."""
  if not image_io.is_writer():
    return
  stem = os.path.splitext(os.path.basename(image_path))[0]
  out_root = os.path.join(workdir, 'segment')
  os.makedirs(out_root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{stem}-', dir=out_root)
  try:
    if len(logits):
      scores = postprocess.semantic_inference(logits, masks)
      semantic = scores.argmax(0)
      pan_map, segments = postprocess.panoptic_inference(
          logits, masks, is_thing, options.object_mask_threshold, options.overlap_threshold)
    else:  # no proposals: a defined empty result
      semantic, pan_map, segments = None, np.zeros(image.shape[:2], np.int32), []
    os.makedirs(os.path.join(tmp, 'masks'))
    if semantic is not None:
      for c in np.unique(semantic):
        image_io.save_png(os.path.join(tmp, 'masks', f'{_file_name(names[c])}.png'),
                      np.repeat(((semantic == c) * 255).astype(np.uint8)[..., None], 3, -1))
    image_io.save_png(os.path.join(tmp, 'overlay.png'), overlay(image, pan_map))
    categories = [{'id': i, 'name': n, 'isthing': int(t)} for i, (n, t) in enumerate(zip(names, is_thing))]
    entry = postprocess.write_coco_panoptic(os.path.join(tmp, 'panoptic.png'), pan_map, segments, stem)
    for segment, info in zip(entry['segments_info'], [s for s in segments if s['area']]):
      segment['score'] = info['score']
    postprocess.write_coco_panoptic_json(os.path.join(tmp, 'panoptic.json'), [entry], categories)
    os.chmod(tmp, 0o777 & ~image_io.umask())  # mkdtemp makes it private
    final = os.path.join(out_root, stem)
    if os.path.isdir(final):
      shutil.rmtree(final)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  names_found = sorted({names[s['category_id']] for s in segments})
  print(f'Wrote {final}: {len(segments)} segments ({", ".join(names_found) or "none"})', flush=True)


def _file_name(name: str) -> str:
  return ''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in name)


def overlay(image, panoptic_map, alpha: float = 0.5):
  """The image with every panoptic segment tinted by a fixed colour per id."""
  colours = np.random.default_rng(0).integers(40, 256, size=(int(panoptic_map.max()) + 1, 3))
  tinted = (1 - alpha) * image + alpha * colours[panoptic_map]
  return np.where(panoptic_map[..., None] > 0, tinted, image).astype(np.uint8)


def default_config(preset: str = 'ViT-L-14-336-quickgelu', resolution: int = 336):
  """The paper's MaskCLIP (ViT-L/14@336, RMA at 6, 12, 18, 24) on COCO panoptic."""
  c = base_config()
  c.system = 'maskclip'
  c.total_steps = 10_000
  c.batch_size = 8
  c.log_every = 50
  c.ckpt_every = 1000
  c.sample_every = 0
  c.optimizer.update(name='adamw', learning_rate=1e-4, weight_decay=0.05, ema_decay=0.0)
  c.frozen = ('^clip/',)  # CLIP stays frozen; only RMA's layers train
  c.sample.use_ema = False
  c.data = ml_collections.ConfigDict(dict(
      name='segmentation', path='', resolution=resolution, random_flip=True, scale_range=(1.0, 1.0),
      max_segments=100, max_proposals=100, proposals='auto', worker_count=0, prefetch=2))
  c.model = ml_collections.ConfigDict(dict(
      clip_preset=preset, clip_checkpoint='', merges='', rma_layers=(6, 12, 18, 24), use_rma=True,
      attention_impl='xla', temperature=0.01, prompt_templates=('{}',), no_object_name='other'))
  c.loss = ml_collections.ConfigDict(dict(
      class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=losses.NO_OBJECT_WEIGHT,
      num_points=losses.NUM_POINTS, oversample_ratio=losses.OVERSAMPLE_RATIO,
      importance_sample_ratio=losses.IMPORTANCE_SAMPLE_RATIO))
  c.inference = ml_collections.ConfigDict(dict(
      object_mask_threshold=postprocess.OBJECT_MASK_THRESHOLD,
      overlap_threshold=postprocess.OVERLAP_THRESHOLD, topk=postprocess.TOPK_PER_IMAGE,
      stuff_classes=''))
  c.classes = ''  # --mode=segment: the vocabulary, comma-separated
  c.image = ''
  c.proposals = ''
  # --mode=eval (and every eval_every steps): mIoU, PQ, mask AP on `path` ('' = data.path), its
  # first `max_images` images (0 = all).
  c.evals.seg = ml_collections.ConfigDict(dict(type='segmentation', path='', max_images=0))
  return c


def tiny(c):
  """CPU-sized: the 'tiny' CLIP (random weights) on the built-in shapes set at 64²."""
  c.total_steps = 20
  c.batch_size = 2
  c.log_every = 5
  c.ckpt_every = 10
  c.data.update(name=seg_data.SAMPLE_NAME, resolution=64, max_segments=8, max_proposals=8)
  c.model.update(clip_preset='tiny', rma_layers=(2, 4))
  c.loss.num_points = 256
  c.inference.topk = 10
  return c
