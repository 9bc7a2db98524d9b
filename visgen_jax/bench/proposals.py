"""Mask proposal network benchmark: `python -m visgen_jax.bench proposals`.

(1) Parity residuals on random weights, CPU (max |difference|): the ResNet-50 backbone's res5 vs
    torchvision's resnet50 (weights through this project's converter), and the whole network
    (pixel decoder output and every prediction's class and mask logits) vs transformers'
    Mask2Former, with the mapping and the small configuration of the network's parity test
    (bench.oracles.MASK2FORMER_SMALL: ResNet-18 backbone, 6 decoder layers; 64×96 images).
(2) Images/s of the Flax network vs transformers' Mask2FormerModel + heads at 512², the paper's
    architecture (ResNet-50, 256 hidden, 6 + 9 layers, 100 queries), the same random weights,
    batch 1, XLA and torch on the same threads; interleaved rounds, best of each.
(3) Compiled FLOPs (XLA's cost analysis; abstract shapes, nothing runs) of the paper's pipeline for
    one 640² image: the proposal network at 640², then MaskCLIP (ViT-L/14@336, RMA at 6, 12, 18,
    24) on the image and its 100 mask logits resized to 336² as the public code does.
(4) Class-agnostic recall (the fraction of ground-truth segments some proposal overlaps with IoU ≥
    0.5) of the `:tiny` network trained on the built-in segmentation set (RECALL_STEPS steps,
    batch RECALL_BATCH; trained once under $VISGEN_BENCH_DIR, reused on reruns), on 64 held-out
    images of the same generator (indices 64–127, never trained on), against grid-of-boxes
    baselines (every cell of n×n grids: n = 1, 3 gives as many boxes as the network's 10 queries,
    n = 1..4 gives 30).

The load average (1, 5, 15 min) is recorded at the start and the end.
"""

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.bench import maskclip as maskclip_bench
from visgen_jax.bench import oracles
from visgen_jax.bench.common import flops_report
from visgen_jax.convert import mask2former as m2f_convert
from visgen_jax.data import segmentation as seg_data
from visgen_jax.data.segmentation import sample as seg_sample
from visgen_jax.eval import proposal_recall
from visgen_jax.models import clip as clip_lib
from visgen_jax.models import resnet
from visgen_jax.models.mask2former import Mask2Former
from visgen_jax.systems import proposals
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

TINY = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'proposals_coco.py') + ':tiny'
SPEED = dict(size=512, rounds=3)
FLOPS = dict(image=640, masks=100, clip_preset='ViT-L-14-336', clip_size=336, rma_layers=(6, 12, 18, 24))
RECALL_STEPS, RECALL_BATCH = 3000, 8
HELD_OUT = range(seg_sample.SAMPLE_SIZE, 2 * seg_sample.SAMPLE_SIZE)
GRIDS = {'grid_10_boxes': (1, 3), 'grid_30_boxes': (1, 2, 3, 4)}


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  oracles.declare_torchvision_ops()
  return torch


# --- (1) parity ----------------------------------------------------------------------------------

def parity_residuals() -> dict:
  """Max |Flax − PyTorch| of the backbone and of the whole network (see the module docstring)."""
  torch = _torch()
  import torchvision  # pylint: disable=g-import-not-at-top
  net = oracles.randomised(torchvision.models.resnet50(), torch, seed=0)
  params, _ = m2f_convert.convert_torchvision_resnet({k: v.numpy() for k, v in net.state_dict().items()})
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 64, 96, 3)).astype(np.float32)
  got = jax.jit(resnet.ResNet(None, 50, norm='frozen').apply)({'params': params['backbone']}, x)['res5']
  with torch.no_grad():
    trunk = torch.nn.Sequential(*list(net.children())[:-2])
    want = trunk(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  result = {'parity_backbone_resnet50_vs_torchvision': float(np.abs(np.asarray(got) - want).max())}

  hf = oracles.transformers_mask2former(torch, oracles.MASK2FORMER_SMALL, seed=5)
  model = Mask2Former(**oracles.MASK2FORMER_SMALL)
  images = np.random.default_rng(1).uniform(0, 255, size=(2, 64, 96, 3)).astype(np.float32)
  predictions, state = jax.jit(lambda p, x: model.apply({'params': p}, x, capture_intermediates=True))(
      oracles.mask2former_from_transformers(hf.state_dict()), images)
  mask_features = state['intermediates']['pixel_decoder']['__call__'][0][0]
  with torch.no_grad():
    out = hf(torch.from_numpy(_normalised(images).transpose(0, 3, 1, 2)))
  wanted = [(a['class_queries_logits'], a['masks_queries_logits']) for a in out.auxiliary_logits]
  wanted.append((out.class_queries_logits, out.masks_queries_logits))
  result['parity_pixel_decoder_vs_transformers'] = float(np.abs(
      np.asarray(mask_features) - out.pixel_decoder_last_hidden_state.numpy().transpose(0, 2, 3, 1)).max())
  result['parity_class_logits_vs_transformers'] = max(
      float(np.abs(np.asarray(g[0]) - w[0].numpy()).max()) for g, w in zip(predictions, wanted))
  result['parity_mask_logits_vs_transformers'] = max(
      float(np.abs(np.asarray(g[1]) - w[1].numpy()).max()) for g, w in zip(predictions, wanted))
  return result


def _normalised(images):
  from visgen_jax.models import mask2former  # pylint: disable=g-import-not-at-top
  return (images - np.float32(mask2former.PIXEL_MEAN)) / np.float32(mask2former.PIXEL_STD)


# --- (2) speed -----------------------------------------------------------------------------------

def speed(size=SPEED['size'], rounds=SPEED['rounds']) -> dict:
  """Seconds per 512² image, Flax vs transformers, same weights and threads (section 2)."""
  torch = _torch()
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  paper = {f: getattr(Mask2Former, f) for f in oracles.MASK2FORMER_SMALL}  # the defaults: the paper's network
  hf = oracles.transformers_mask2former(torch, paper, seed=5)
  params = jax.device_put(oracles.mask2former_from_transformers(hf.state_dict()))
  images = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
  forward = jax.jit(lambda p, x: Mask2Former().apply({'params': p}, x)[-1])
  pixels = torch.from_numpy(_normalised(images).transpose(0, 3, 1, 2).copy())

  def run_torch():
    with torch.no_grad():
      return hf(pixels).masks_queries_logits

  flax_masks = np.asarray(forward(params, images)[1])
  difference = float(np.abs(flax_masks - run_torch().numpy()).max())
  best, _ = maskclip_bench.interleaved_best(
      {'flax': lambda: forward(params, images)[1].block_until_ready(), 'torch': run_torch}, rounds)
  return {'speed_images_per_sec_flax_512': 1 / best['flax'], 'speed_images_per_sec_transformers_512': 1 / best['torch'],
          'speed_ratio_flax_over_transformers_512': best['torch'] / best['flax'], 'speed_threads': threads,
          'speed_max_mask_logit_difference_512': difference,
          'speed_flax_flops_512': flops_report(forward, (params, images), best['flax'])}


# --- (3) FLOPs -----------------------------------------------------------------------------------

def pipeline_flops(image=FLOPS['image'], masks=FLOPS['masks'], preset=FLOPS['clip_preset'],
                   clip_size=FLOPS['clip_size'], rma_layers=FLOPS['rma_layers']) -> dict:
  """XLA FLOPs of the proposal network and of MaskCLIP on its masks, for one image (section 3)."""
  network = Mask2Former(num_queries=masks)
  images = jax.ShapeDtypeStruct((1, image, image, 3), jnp.float32)
  network_params = jax.eval_shape(lambda x: network.init(jax.random.key(0), x), images)['params']
  propose = lambda p, x: network.apply({'params': p}, x)[-1][1]
  proposal_flops = maskclip_bench.compiled_flops(propose, network_params, images)

  tower = clip_lib.vision_tower(preset)
  clip_model, classify = maskclip_bench.maskclip_fn(tower, rma_layers, clip_size)
  clip_params = maskclip_bench.maskclip_abstract_params(clip_model, clip_size, masks)

  def end_to_end(network_params, clip_params, x):
    logits = propose(network_params, x)  # [1, masks, image/4, image/4]
    # As the public code: image and mask logits straight to CLIP's input size.
    small = jax.image.resize(x / 127.5 - 1, (1, clip_size, clip_size, 3), 'linear')
    return classify(clip_params, small, jax.image.resize(logits, (1, masks, clip_size, clip_size), 'linear'))

  total = maskclip_bench.compiled_flops(end_to_end, network_params, clip_params, images)
  return {f'flops_proposals_{image}px': proposal_flops, f'flops_proposals_plus_maskclip_{image}px': total,
          f'flops_maskclip_share_{image}px': (total - proposal_flops) / total}


# --- (4) recall ----------------------------------------------------------------------------------

def grid_boxes(height: int, width: int, grids) -> np.ndarray:
  """Bool masks [K, H, W] of every cell of an n×n grid over the image, for each n in `grids`."""
  masks = []
  for n in grids:
    ys, xs = np.linspace(0, height, n + 1).round().astype(int), np.linspace(0, width, n + 1).round().astype(int)
    for i in range(n):
      for j in range(n):
        box = np.zeros((height, width), bool)
        box[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = True
        masks.append(box)
  return np.stack(masks)


def trained_tiny_network(steps=RECALL_STEPS, batch=RECALL_BATCH):
  """(config, Mask2Former, params) of the tiny network trained on the built-in set (reused)."""
  workdir = os.path.join(os.environ.get('VISGEN_BENCH_DIR', os.path.join(tempfile.gettempdir(), 'visgen_bench')),
                         'proposals_tiny')
  config = config_lib.load_config(TINY, [f'total_steps={steps}', f'batch_size={batch}', 'ckpt_every=500',
                                         'log_every=100'])
  trainer.train(config, workdir)
  model, params = proposals.load_network(workdir, 'the benchmark run', config)
  return config, model, params


def recall(threshold: float = 0.5) -> dict:
  """Section (4): class-agnostic recall of the tiny network vs grid-of-boxes baselines."""
  config, model, params = trained_tiny_network()
  propose = proposals.make_proposer(model, params, config.data.resolution, config.propose.topk)
  found = {name: [] for name in ('network', *GRIDS)}
  is_thing = []
  counts = []
  for i in HELD_OUT:
    image, ids, segments = seg_data.sample_example(i)
    truth = np.stack([ids == s[0] for s in segments])
    is_thing.extend(seg_sample.SAMPLE_CATEGORIES[s[1]]['isthing'] for s in segments)
    masks, _ = propose(image, f'held-out image {i}')
    counts.append(len(masks))
    found['network'].append(proposal_recall.best_iou(masks > 0, truth) >= threshold)
    for name, grids in GRIDS.items():
      found[name].append(proposal_recall.best_iou(grid_boxes(*ids.shape, grids), truth) >= threshold)
  is_thing = np.array(is_thing)
  result = {'recall_images': len(HELD_OUT), 'recall_segments': int(is_thing.size),
            'recall_train_steps': RECALL_STEPS, 'recall_network_proposals_per_image': float(np.mean(counts))}
  for name, hits in found.items():
    hits = np.concatenate(hits)
    result[f'recall_iou{threshold}_{name}'] = float(hits.mean())
    result[f'recall_iou{threshold}_{name}_things'] = float(hits[is_thing].mean())
    result[f'recall_iou{threshold}_{name}_stuff'] = float(hits[~is_thing].mean())
  return result


def run() -> dict:
  start, load_start = time.perf_counter(), os.getloadavg()
  result = {}
  result.update(parity_residuals())
  result.update(recall())
  result.update(pipeline_flops())
  result.update(speed())
  return dict(result, seconds=time.perf_counter() - start, load_average_start=load_start,
              load_average_end=os.getloadavg())
