"""MaskCLIP benchmark: `python -m visgen_jax.bench maskclip`.

(1) FLOPs to get features for 100 masks of a 640×640 image with ViT-L/14,
    from XLA's cost analysis of the compiled functions (abstract shapes, no
    weights, nothing runs; with attention 'xla' the programs hold no loops or
    custom calls XLA could miss), beside an analytic count (2 FLOPs per
    multiply-add of every matmul and convolution; elementwise work, softmax and
    layer norms left out, so XLA's figure should be a few % higher):
    - crop: the "CLIP crop" baseline, 100 passes of ViT-L/14 at 224² on the
      masked, cropped and resized image (`clip_crop_features`: masking, crop
      and resize included);
    - mask_tokens: one MaskCLIP pass with 100 mask class tokens, no RMA;
    - rma: the same with Relative Mask Attention at layers 6, 12, 18, 24, its
      refined masks part of the output (as MaskCLIP returns them).
    640 is not a multiple of the patch size 14: the image and masks are taken
    as 644² (padded by 2 pixels a side, which costs no FLOPs; 46×46 patches),
    so the one MaskCLIP pass carries 2,117 image tokens. The public MaskCLIP
    code instead resizes image and masks to CLIP's input resolution first
    (which is where the paper's 0.3 TFLOPs can come from), so the mask-token
    models are also counted with image and masks resized (antialiased
    bilinear, counted) to 336² (ViT-L/14@336, the paper's tower) and 224²
    (ViT-L/14). Every ratio is against the ViT-L/14 crop baseline; the 336²
    row is also compared with crops through its own tower at 336². Attention
    is XLA's dense [T, T] attention (the Pallas kernel, which skips key blocks
    no mask sees, does not run on CPU); 'total_visible' counts only what the
    tokens may see.
(2) CPU wall time of the same three at ViT-B/16, 224², 20 masks (rectangles
    and ellipses), batch 1, random weights, RMA at layers 3, 6, 9, 12; timed
    in interleaved rounds, best of each.
(3) The Flax CLIP image encoder vs open_clip's PyTorch one: open_clip's
    'ViT-B-16' with random weights, converted by the project's converter
    (the embeddings' max difference is reported), batch 4 at 224²,
    interleaved rounds, best of each. 'every_core': XLA's CPU client and torch
    (set_num_threads) both on the cores this process may use; torch on one
    thread too, since its pool can lose to one thread on a busy machine.
    'one_core': both again in a subprocess pinned to one core, where other
    work's load hurts neither more (wall and CPU time; the CPU-time ratio is
    the steadier one on a busy machine), with one block split by part (in-
    projection, attention core, out-projection, MLP, layer norm; batch 4, 197
    tokens), the attention core also computed heads-first ([B, H, T, D]), and
    each side's top ops from its profiler (XLA: a JAX profiler trace, ops named
    by their source; torch: torch.profiler), to show where the time goes;
    'one_core_xla_defaults' the same with XLA's own defaults for the flags the
    project sets (`visgen_jax.xla_flags`).

The machine may be shared: every timing is a minimum, and the load average
(1, 5, 15 min) is recorded at the start and the end.
"""

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax import xla_flags
from visgen_jax.bench import oracles
from visgen_jax.bench.common import flops_report, torch_op_profile, xla_op_profile
from visgen_jax.convert.clip import abstract_params, convert_clip_state_dict
from visgen_jax.models import clip as clip_lib
from visgen_jax.models.maskclip import MaskCLIP, clip_crop_features

IMAGE = 640
IMAGE_PADDED = 644  # the nearest multiple of 14 at or above 640
MASKS = 100
PAPER_TFLOPS = {'crop': 10.5, 'maskclip': 0.3}
FLOP_GOAL = 30.0
RMA_LAYERS_L = (6, 12, 18, 24)
WALL = dict(preset='ViT-B-16', size=224, masks=20, rma_layers=(3, 6, 9, 12), rounds=5)
ENCODER = dict(preset='ViT-B-16', size=224, batch=4, rounds=6)


# --- FLOP counting -------------------------------------------------------------------------------

def compiled_flops(fn, *args) -> float:
  """XLA's FLOP count of jit(fn) compiled for these (abstract) arguments; nothing runs."""
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()['flops'])


def tower_flops(tower, num_patches: int, mask_tokens: int = 0, outputs: int = 1) -> dict:
  """Analytic FLOPs of one ViT pass over [mask_tokens | class | num_patches] tokens.

  'dense_attention' is what XLA's dense attention computes (every query × every
  key); 'visible_attention' what the tokens may see: no one sees a mask token.
  """
  w, p = tower.width, tower.patch_size
  t = mask_tokens + 1 + num_patches
  image_tokens = 1 + num_patches
  return {
      'patch_embedding': 2 * num_patches * 3 * p * p * w,
      'linear': tower.layers * 24 * t * w * w,  # in-proj 3w², out-proj w², MLP 8w²
      'dense_attention': tower.layers * 4 * t * t * w,  # q·k and weights·v
      'visible_attention': tower.layers * 4 * (image_tokens + mask_tokens) * image_tokens * w,
      'head': 2 * outputs * w * tower.embed_dim,
  }


def rma_layer_flops(tower, num_patches: int, masks: int) -> float:
  """Analytic FLOPs RMA adds to one block: mask patchifier, k', two logit terms, refinement."""
  w, pp = tower.width, tower.patch_size**2
  return (2 * masks * num_patches * pp * w  # strided conv of the 1-channel masks
          + 2 * num_patches * w * w  # k' = Linear(ln_1(x))
          + 2 * 2 * masks * num_patches * w  # q'·k' and q·k on the mask × patch block
          + 2 * masks * num_patches * w * pp)  # 1×1 conv width → patch²


def resize_flops(channels: int, size_in: int, size_out: int) -> float:
  """Separable resize of a square image: the two 1-D weight contractions."""
  return 2 * channels * size_out * size_in * (size_in + size_out)


def _totals(terms: dict) -> dict:
  """{'total', 'total_visible' (attention counted on visible blocks only), terms...}."""
  base = sum(v for k, v in terms.items() if not k.endswith('_attention'))
  return dict(total=base + terms['dense_attention'],
              total_visible=base + terms['visible_attention'], **terms)


def crop_analytic_flops(tower, image_size: int, masks: int) -> dict:
  """Analytic FLOPs of the crop baseline: `masks` tower passes at its trained size, + resizes."""
  s = tower.image_size
  terms = {k: masks * v for k, v in tower_flops(tower, (s // tower.patch_size)**2).items()}
  return _totals(dict(terms, crop_resize=masks * resize_flops(3, image_size, s)))


def maskclip_analytic_flops(tower, image_size: int, masks: int, rma_layers=(),
                            model_size: int | None = None) -> dict:
  """Analytic FLOPs of one MaskCLIP pass (RMA at `rma_layers` if any) on an image_size² image.

  Image and masks are resized to model_size² first when it is given.
  """
  s = model_size or image_size
  n = (s // tower.patch_size)**2
  resize = resize_flops(3 + masks, image_size, s) if s != image_size else 0
  return _totals(dict(tower_flops(tower, n, masks, outputs=masks),
                      rma=len(rma_layers) * rma_layer_flops(tower, n, masks), input_resize=resize))


def abstract_inputs(image_size: int, masks: int):
  """Shapes of one image [1, S, S, 3] and its mask logits [1, M, S, S]."""
  return (jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
          jax.ShapeDtypeStruct((1, masks, image_size, image_size), jnp.float32))


def crop_fn(tower):
  """(params, images, masks) → the CLIP-crop baseline's mask features."""
  return lambda params, images, masks: clip_crop_features(tower, params, images, masks)


def maskclip_fn(tower, rma_layers, model_size=None):
  """(params, images, masks) → (mask features, refined masks), resized to model_size first."""
  model = MaskCLIP(tower, rma_layers=tuple(rma_layers), use_rma=bool(rma_layers))

  def features(params, images, masks):
    if model_size is not None and model_size != images.shape[1]:
      b, m = masks.shape[:2]
      images = jax.image.resize(images, (b, model_size, model_size, 3), 'linear')
      masks = jax.image.resize(masks, (b, m, model_size, model_size), 'linear')
    return model.apply({'params': params}, images, masks)

  return model, features


def maskclip_abstract_params(model, image_size: int, masks: int):
  """Shapes of a MaskCLIP's params (no arrays made)."""
  images, logits = abstract_inputs(image_size, masks)
  return jax.eval_shape(lambda i, m: model.init(jax.random.key(0), i, m), images, logits)['params']


def _checked(xla: float, analytic: dict) -> dict:
  return {'xla': xla, 'analytic': analytic, 'ratio_xla_over_analytic': xla / analytic['total']}


def flop_comparison(image_size=IMAGE_PADDED, masks=MASKS, rma_layers=RMA_LAYERS_L,
                    rows=((None, 'ViT-L-14'), (336, 'ViT-L-14-336'), (224, 'ViT-L-14')),
                    baseline='ViT-L-14'):
  """Section (1): XLA and analytic FLOPs, ratios against the `baseline` tower's crop baseline.

  rows: (model_size, preset) of the mask-token models; model_size None runs
  them at image_size. A row whose tower is not the baseline's is also compared
  with the crop baseline of its own tower.
  """
  images, logits = abstract_inputs(image_size, masks)
  crops = {}

  def crop(preset):
    if preset not in crops:
      tower = clip_lib.vision_tower(preset)
      xla = compiled_flops(crop_fn(tower), abstract_params(tower), images, logits)
      crops[preset] = _checked(xla, crop_analytic_flops(tower, image_size, masks))
    return crops[preset]

  result = {}
  for model_size, preset in rows:
    tower = clip_lib.vision_tower(preset)
    row = {}
    for name, layers in (('mask_tokens', ()), ('rma', rma_layers)):
      model, fn = maskclip_fn(tower, layers, model_size)
      params = maskclip_abstract_params(model, model_size or image_size, masks)
      row[name] = _checked(compiled_flops(fn, params, images, logits),
                           maskclip_analytic_flops(tower, image_size, masks, layers, model_size))
    for name in ('mask_tokens', 'rma'):
      row[f'ratio_crop_over_{name}'] = crop(baseline)['xla'] / row[name]['xla']
      if preset != baseline:
        row[f'ratio_own_tower_crop_over_{name}'] = crop(preset)['xla'] / row[name]['xla']
    key = f'at_{image_size}px' if model_size is None else f'resized_to_{model_size}px'
    result[f'{key}_{preset}'] = row
  crop_rows = {f'crop_{preset}_{clip_lib.CLIP_PRESETS[preset]["vision"]["image_size"]}px': value
               for preset, value in crops.items()}
  return crop_rows | result


def _tflops(tree):
  """Every FLOP figure in TFLOPs, ratios kept."""
  if isinstance(tree, dict):
    return {k: v if k.startswith('ratio') else _tflops(v) for k, v in tree.items()}
  return round(tree / 1e12, 4)


# --- timing --------------------------------------------------------------------------------------

def interleaved_best(fns: dict, rounds: int) -> tuple[dict, dict]:
  """({name: minimum wall time}, {name: minimum CPU time of this process}) of blocking calls,
  one call of each per round after a warm-up.

  Interleaving lets load from other work hit every contender alike. In a process pinned to
  one core the CPU time leaves out the time other work held that core, so it is the steadier
  figure on a busy machine.
  """
  for fn in fns.values():
    fn()
  wall = {name: math.inf for name in fns}
  cpu = dict(wall)
  for _ in range(rounds):
    for name, fn in fns.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      fn()
      wall[name] = min(wall[name], time.perf_counter() - start)
      cpu[name] = min(cpu[name], time.process_time() - start_cpu)
  return wall, cpu


def random_masks(rng, count: int, size: int) -> np.ndarray:
  """[count, size, size] ±10 logits: an ellipse or a rectangle covering ~2–30 % of the image."""
  yy, xx = np.mgrid[:size, :size] + 0.5
  masks = np.zeros((count, size, size), bool)
  for i in range(count):
    ry, rx = size * np.sqrt(rng.uniform(0.02, 0.3)) / 2 * rng.uniform(0.7, 1.4, 2)
    cy, cx = rng.uniform(0, size, 2)
    if i % 2:
      masks[i] = ((yy - cy) / ry)**2 + ((xx - cx) / rx)**2 <= 1
    else:
      masks[i] = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
  return np.where(masks, 10.0, -10.0).astype(np.float32)


def wall_times(preset=WALL['preset'], size=WALL['size'], masks=WALL['masks'],
               rma_layers=WALL['rma_layers'], rounds=WALL['rounds']):
  """Section (2): seconds per image for crop / mask tokens / RMA, random weights; XLA's FLOPs."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (1, size, size, 3)), jnp.float32)
  logits = jnp.asarray(random_masks(rng, masks, size)[None])
  tower = clip_lib.vision_tower(preset)
  model, rma = maskclip_fn(tower, rma_layers)
  params = jax.jit(model.init)(jax.random.key(0), images, logits)['params']
  _, no_rma = maskclip_fn(tower, ())
  fns = {'crop': (jax.jit(crop_fn(tower)), params['clip']),
         'mask_tokens': (jax.jit(no_rma), {'clip': params['clip']}),
         'rma': (jax.jit(rma), params)}
  calls = {name: (lambda f=f, p=p: jax.block_until_ready(f(p, images, logits)))
           for name, (f, p) in fns.items()}
  best, _ = interleaved_best(calls, rounds)
  flops = {name: compiled_flops(f, p, images, logits) for name, (f, p) in fns.items()}
  return {'seconds': best, 'xla_gflops': {name: v / 1e9 for name, v in flops.items()},
          'ratio_crop_over_mask_tokens': best['crop'] / best['mask_tokens'],
          'ratio_crop_over_rma': best['crop'] / best['rma'],
          'flop_ratio_crop_over_mask_tokens': flops['crop'] / flops['mask_tokens'],
          'flop_ratio_crop_over_rma': flops['crop'] / flops['rma']}


def heads_first_attention(q, k, v):
  """softmax(q·kᵀ/√D)·v computed with the heads before the tokens ([B, H, T, D]).

  Same math as `dot_product_attention`; only the layout handed to XLA differs
  (the profile shows what that layout is worth on this CPU).
  """
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  logits = jnp.einsum('bhqd,bhkd->bhqk', q / math.sqrt(q.shape[-1]), k)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', weights, v), 1, 2)


def _encoder_parts(torch, batch, tokens, width, heads, act, attend, rounds):
  """One block's pieces, Flax/XLA vs torch, same shapes, float32: ms each and throughput ratio."""
  f = torch.nn.functional
  rng = np.random.default_rng(1)
  block = clip_lib.ResidualAttentionBlock(width, heads, act)
  x = rng.standard_normal((batch, tokens, width)).astype(np.float32)
  qkv = rng.standard_normal((batch, tokens, 3, heads, width // heads)).astype(np.float32)
  params = jax.jit(lambda key: block.init(key, x, lambda q, k, v: q))(jax.random.key(0))['params']
  tx, tqkv = torch.from_numpy(x), torch.from_numpy(qkv)
  dense = {name: (torch.from_numpy(np.asarray(params[name]['kernel']).T.copy()),
                  torch.from_numpy(np.array(params[name]['bias'])))
           for name in ('in_proj', 'out_proj', 'c_fc', 'c_proj')}
  torch_act = (lambda a: a * torch.sigmoid(1.702 * a)) if act == 'quick_gelu' else f.gelu
  linear = lambda name: lambda a: f.linear(a, *dense[name])
  sdpa = lambda a: f.scaled_dot_product_attention(*a.permute(2, 0, 3, 1, 4))
  unpack = lambda attend: lambda p, a: attend(a[:, :, 0], a[:, :, 1], a[:, :, 2])
  sub = lambda method: lambda p, a: block.apply({'params': p}, a, method=method)
  # name: (flax fn(params, input), input, torch fn(input), torch input)
  pieces = {
      'in_proj': (sub(lambda m, a: m.in_proj(a)), x, linear('in_proj'), tx),
      'attention_core': (unpack(attend), qkv, sdpa, tqkv),
      'attention_core_heads_first': (unpack(heads_first_attention), qkv, sdpa, tqkv),
      'out_proj': (sub(lambda m, a: m.out_proj(a)), x, linear('out_proj'), tx),
      'mlp': (sub(lambda m, a: m.c_proj(m.activation(m.c_fc(a)))), x,
              lambda a: linear('c_proj')(torch_act(linear('c_fc')(a))), tx),
      'layer_norm': (sub(lambda m, a: m.ln_1(a)), x,
                     lambda a: f.layer_norm(a, (width,), eps=1e-5), tx),
  }
  calls = {}
  for name, (ours, arg, theirs, targ) in pieces.items():
    jitted = jax.jit(ours)
    calls[f'{name}/flax'] = lambda j=jitted, a=jax.device_put(arg): jax.block_until_ready(j(params, a))
    calls[f'{name}/torch'] = lambda t=theirs, a=targ: t(a)
  with torch.inference_mode():
    best, _ = interleaved_best(calls, rounds)
  return {name: {'flax_ms': 1e3 * best[f'{name}/flax'], 'torch_ms': 1e3 * best[f'{name}/torch'],
                 'ratio_flax_over_torch': best[f'{name}/torch'] / best[f'{name}/flax']}
          for name in pieces}


def encoder_images_per_s(preset=ENCODER['preset'], size=ENCODER['size'], batch=ENCODER['batch'],
                         rounds=ENCODER['rounds']) -> dict:
  """Flax image tower vs open_clip's, same weights and batch, on the cores this process may use.

  torch runs on as many threads as there are cores (and, with several cores,
  on one thread too); XLA's CPU client uses every core it is allowed.
  """
  import torch
  open_clip = oracles.import_open_clip()
  threads = len(os.sched_getaffinity(0))
  torch.manual_seed(0)
  reference = open_clip.create_model_and_transforms(preset, pretrained=None)[0].eval()
  tower = clip_lib.vision_tower(preset)
  state = {k: v.numpy() for k, v in reference.state_dict().items() if k.startswith('visual.')}
  # On the device, as a model's state is: numpy arguments would be copied in on every call.
  params = jax.device_put(convert_clip_state_dict(state, tower))
  images = np.random.default_rng(2).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  pixels = ((images + 1) / 2 - np.array(clip_lib.CLIP_MEAN)) / np.array(clip_lib.CLIP_STD)
  images = jax.device_put(images)
  pixels = torch.from_numpy(pixels.astype(np.float32).transpose(0, 3, 1, 2).copy())
  encode = jax.jit(lambda p, i: tower.apply({'params': p}, i))

  def torch_encode(num_threads):
    torch.set_num_threads(num_threads)
    reference.encode_image(pixels)

  calls = {'flax': lambda: jax.block_until_ready(encode(params, images)),
           'torch': lambda: torch_encode(threads)}
  if threads > 1:
    calls['torch_1_thread'] = lambda: torch_encode(1)
  with torch.inference_mode():
    ours, theirs = np.asarray(encode(params, images)), reference.encode_image(pixels).numpy()
    best, cpu = interleaved_best(calls, rounds)
  torch.set_num_threads(threads)
  result = {
      'threads': threads, 'torch': torch.__version__, 'open_clip': open_clip.__version__,
      'max_abs_embedding_diff': float(np.abs(ours - theirs).max()),
      'max_abs_embedding': float(np.abs(theirs).max()),
      'images_per_s': {name: batch / seconds for name, seconds in best.items()},
      'ratio_flax_over_torch': best['torch'] / best['flax'],
      'flax_flops': flops_report(encode, (params, images), best['flax']),
  }
  if threads == 1:
    result['cpu_seconds'] = cpu
    result['ratio_flax_over_torch_cpu_time'] = cpu['torch'] / cpu['flax']
  return result


def op_profiles(preset=ENCODER['preset'], size=ENCODER['size'], batch=ENCODER['batch']) -> dict:
  """The top ops of one tower call, each side's profiler (random weights, not shared)."""
  import torch
  open_clip = oracles.import_open_clip()
  reference = open_clip.create_model_and_transforms(preset, pretrained=None)[0].eval()
  tower = clip_lib.vision_tower(preset)
  images = jnp.zeros((batch, size, size, 3))
  params = jax.jit(tower.init)(jax.random.key(0), images)['params']
  encode = jax.jit(lambda p, i: tower.apply({'params': p}, i))
  pixels = torch.zeros(batch, 3, size, size)
  with torch.inference_mode():
    theirs = torch_op_profile(lambda: reference.encode_image(pixels))
  return {'flax': xla_op_profile(encode, (params, images)), 'torch': theirs}


def one_core_profile() -> dict:
  """`encoder_images_per_s`, one block by part and each side's top ops; meant for a process
  pinned to one core."""
  import torch
  result = encoder_images_per_s()
  size, tower = ENCODER['size'], clip_lib.vision_tower(ENCODER['preset'])
  tokens = (size // tower.patch_size)**2 + 1
  # The pieces take milliseconds: more rounds cost little and steady the minimum.
  result['one_block_parts'] = _encoder_parts(torch, ENCODER['batch'], tokens, tower.width,
                                             tower.heads, tower.act, tower.attend,
                                             4 * ENCODER['rounds'])
  result['top_ops'] = op_profiles()
  return result


def _on_one_core(project_flags: bool = True) -> dict:
  """`one_core_profile` in a subprocess pinned to one core before XLA and torch start; with
  project_flags False, JAX starts before visgen_jax is imported, so XLA keeps its own defaults
  for the flags `visgen_jax.xla_flags` would set."""
  start_jax_first = '' if project_flags else 'import jax; jax.devices(); '
  code = ('import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); import json; '
          f'{start_jax_first}from visgen_jax.bench import maskclip as m; '
          'print(json.dumps(dict(m.one_core_profile(), xla_flags=os.environ.get("XLA_FLAGS"))))')
  env = dict(os.environ)
  if not project_flags:
    env['XLA_FLAGS'] = xla_flags.without_defaults(env.get('XLA_FLAGS', ''))
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f'the one-core encoder timing failed:\n{proc.stderr[-4000:]}')
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  if not project_flags:
    result['xla_flags'] = 'XLA defaults (JAX started before visgen_jax set its flags)'
  return result


def encoder_vs_open_clip() -> dict:
  """Section (3): on every core, on one core, and on one core with XLA's own flag defaults."""
  every = encoder_images_per_s()
  speeds = every['images_per_s']
  return {
      'model': f'{ENCODER["preset"]} image tower, batch {ENCODER["batch"]} at '
               f'{ENCODER["size"]}², float32',
      'goal_ratio': 1.0,
      'every_core': every,
      'ratio_flax_over_best_torch': speeds['flax'] / max(speeds['torch'],
                                                          speeds.get('torch_1_thread', 0)),
      'one_core': _on_one_core(),
      'one_core_xla_defaults': _on_one_core(project_flags=False),
  }


def run() -> dict:
  start, load_start = time.perf_counter(), os.getloadavg()
  flops = flop_comparison()
  wall = wall_times()
  encoder = encoder_vs_open_clip()
  return {
      'machine': f'{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()})',
      'load_average_start': load_start, 'load_average_end': os.getloadavg(),
      'flops_100_masks_of_640px_image_vit_l14': {
          'image': f'{IMAGE}² taken as {IMAGE_PADDED}² (nearest multiple of 14, 46×46 patches); '
                   '"resized_to" rows resize image and masks first (resize counted)',
          'tflops': _tflops(flops), 'paper_tflops': PAPER_TFLOPS, 'goal_ratio': FLOP_GOAL,
      },
      'cpu_wall_vit_b16_224px_20_masks_batch_1': wall,
      'clip_image_encoder_flax_vs_open_clip': encoder,
      'bench_seconds': time.perf_counter() - start,
  }
