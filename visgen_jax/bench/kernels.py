"""Kernel benchmark: `python -m visgen_jax.bench kernels`.

MaskCLIP's masked attention (visgen_jax.kernels.masked_attention):
(a) correctness: max |kernel − reference| of the output and of the gradients,
    fp32 and bf16;
(b) the jitted XLA reference's time here (one ViT-L attention layer: 16 heads
    of 64, 100 mask tokens, 24×24 and 46×46 patches), forward and forward+backward;
(c) for 100 COCO-like masks (blobs and rectangles covering 1–30 % of the
    patches) the fraction of attention blocks the kernel skips and the FLOPs and
    bytes it saves, counted from the kernel's real block schedule;
(d) whether the kernel lowers for TPU (Mosaic) and for CUDA (Triton / Mosaic GPU);
(e) on a GPU or TPU: kernel vs XLA reference time, forward and backward.

Patch-DM's feature collage (visgen_jax.kernels.collage_pallas), per decoder
level of the paper's 64-pixel patches (64²×64, 32²×128, 16²×256, 8²×512) on
the padded grid of a 1024×512 image (17×9 patches, batch 1):
(a) max |kernel − reference| of the output and of the gradient (a copy: 0);
(b) the jitted XLA reference's time here, forward and forward+backward, and
    the bytes a copy must move (read + write of the output);
(c) whether the kernel (forward and gradient) lowers for TPU and CUDA;
(d) on a GPU or TPU: kernel vs XLA reference time, forward and backward.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.bench.common import best_time, flops_report
from visgen_jax.kernels import collage as collage_ref
from visgen_jax.kernels import collage_pallas
from visgen_jax.kernels import masked_attention as ma

HEADS, HEAD_DIM, MASKS = 16, 64, 100  # ViT-L/14 and MaskCLIP's 100 mask tokens
GRIDS = (24, 46)
# (block_q, block_k, block_m): TPU-shaped, GPU-shaped, and one mask-token block for all 100.
BLOCKS = ((128, 128, 32), (128, 128, 16), (64, 64, 16), (128, 128, 128))


def _inputs(key, b, m, n, h=HEADS, d=HEAD_DIM, dtype=jnp.float32, masks=None):
  keys = jax.random.split(key, 5)
  t = m + 1 + n
  q, k, v = (jax.random.normal(keys[i], (b, t, h, d)).astype(dtype) for i in range(3))
  mask = jax.random.bernoulli(keys[3], 0.2, (b, m, n)) if masks is None else masks
  bias = jax.random.normal(keys[4], (b, h, m, n)).astype(dtype)
  return q, k, v, mask, bias


def coco_like_masks(rng, count, side):
  """`count` masks over a side×side patch grid: 1–3 ellipses or rectangles, 1–30 % coverage."""
  yy, xx = np.mgrid[:side, :side] + 0.5
  masks = np.zeros((count, side, side), bool)
  for i in range(count):
    target = rng.uniform(0.01, 0.30) * side * side
    shapes = rng.integers(1, 4)
    cy, cx = rng.uniform(0, side, 2)
    for _ in range(shapes):
      # Each part gets an equal share of the area around a nearby centre.
      area = target / shapes
      aspect = rng.uniform(0.4, 2.5)
      hh, ww = math.sqrt(area / aspect), math.sqrt(area * aspect)
      y, x = cy + rng.normal(0, hh / 2), cx + rng.normal(0, ww / 2)
      if rng.random() < 0.5:
        part = (np.abs(yy - y) <= hh / 2) & (np.abs(xx - x) <= ww / 2)
      else:
        part = ((yy - y) / (hh / math.sqrt(math.pi)))**2 + ((xx - x) / (ww / math.sqrt(math.pi)))**2 <= 1
      masks[i] |= part
  return masks.reshape(count, side * side)


def correctness():
  """(a) residuals on a small problem with skipped blocks, and on MaskCLIP's 100 + 1 + 576."""
  out = {}
  fp32 = jax.jit(functools.partial(ma.masked_attention, block_q=16, block_k=32))
  small = _inputs(jax.random.key(0), 2, 20, 64, h=2, d=16)
  masks = coco_like_masks(np.random.default_rng(0), 2 * 20, 8).reshape(2, 20, 64)
  small = small[:3] + (jnp.asarray(masks), small[4])
  cot = jax.random.normal(jax.random.key(1), small[0].shape)

  def loss(fn, q, k, v, bias):
    return jnp.sum(fn(q, k, v, small[3], bias) * cot)

  grads = jax.jit(jax.grad(functools.partial(loss, fp32), argnums=(0, 1, 2, 3)))(*small[:3], small[4])
  ref_grads = jax.grad(functools.partial(loss, ma.masked_attention_reference), argnums=(0, 1, 2, 3))(
      *small[:3], small[4])
  out['fp32_small_forward'] = float(jnp.abs(fp32(*small) - ma.masked_attention_reference(*small)).max())
  out['fp32_small_grads'] = max(float(jnp.abs(g - r).max()) for g, r in zip(grads, ref_grads))
  bf16 = tuple(x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in small)
  f32 = tuple(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in bf16)
  out['bf16_small_forward_vs_fp32_reference'] = float(
      jnp.abs(fp32(*bf16).astype(jnp.float32) - ma.masked_attention_reference(*f32)).max())
  big = _inputs(jax.random.key(2), 1, MASKS, 576, h=2)
  out['fp32_maskclip_100_1_576_forward'] = float(
      jnp.abs(jax.jit(ma.masked_attention)(*big) - ma.masked_attention_reference(*big)).max())
  return out


def reference_time():
  """(b) the jitted XLA reference on this machine, one ViT-L attention layer, batch 1."""
  out = {}
  for side in GRIDS:
    q, k, v, mask, bias = _inputs(jax.random.key(3), 1, MASKS, side * side)
    fwd = jax.jit(ma.masked_attention_reference)
    grad = jax.jit(jax.grad(lambda q, k, v, b: jnp.sum(ma.masked_attention_reference(q, k, v, mask, b)),
                            argnums=(0, 1, 2, 3)))
    forward = best_time(lambda: fwd(q, k, v, mask, bias).block_until_ready())
    out[f'{side}x{side}'] = {
        'forward_s': forward,
        'forward_backward_s': best_time(lambda: jax.block_until_ready(grad(q, k, v, bias))),
        'forward_flops': flops_report(fwd, (q, k, v, mask, bias), forward),
    }
  return out


def block_savings(masks, block_q, block_k, block_m, head_dim=HEAD_DIM, heads=HEADS, itemsize=2):
  """(c) blocks, FLOPs and bytes of the kernel's schedule vs a dense flash kernel over T × T.

  The dense baseline is a flash kernel fed the dense Eq. 2.1 mask: it visits every
  (query block, key block) of the [M | 1 | N] sequence. Per visited block and head
  the kernel does 4·bq·bk·D FLOPs (q·kᵀ and p·v) and reads a K and a V tile (plus a
  float32 bias tile in the masked launch); it reads the int8 mask tile of every
  masked-launch block to decide whether to skip it. Bytes are this tile traffic.
  """
  b, m, n = masks.shape
  t = m + 1 + n
  nq_mask = -(-m // block_m)
  nq_img, nk = -(-(n + 1) // block_q), -(-(n + 1) // block_k)
  schedule = ma.block_schedule(masks, block_m, block_k)
  visited_mask = int(schedule.sum())
  dense = b * (-(-t // block_q)) * (-(-t // block_k))
  flops = lambda rows: 4 * rows * block_k * head_dim * heads
  kv_tile = 2 * block_k * head_dim * itemsize * heads
  tile = lambda rows: rows * block_k * heads  # int8 mask tile; bias tiles are 4× this
  visited_img = b * nq_img * nk
  kernel_flops = visited_mask * flops(block_m) + visited_img * flops(block_q)
  dense_flops = dense * flops(block_q)
  kernel_bytes = ((visited_mask + visited_img) * kv_tile + visited_mask * 4 * tile(block_m)
                  + b * nq_mask * nk * tile(block_m))
  dense_bytes = dense * (kv_tile + 5 * tile(block_q))
  # The same masks in the model's order (what the kernel would skip without sorting).
  unsorted = int(_schedule_unsorted(masks, block_m, block_k).sum())
  exact_flops = 4 * head_dim * heads * (b * (n + 1) * (n + 1) + int(masks.sum()) + b * m)
  return {
      'block_q': block_q, 'block_k': block_k, 'block_m': block_m,
      'mask_rows_blocks_skipped_fraction': 1 - visited_mask / (b * nq_mask * nk),
      'mask_rows_blocks_skipped_fraction_unsorted': 1 - unsorted / (b * nq_mask * nk),
      'flops_kernel': kernel_flops, 'flops_dense': dense_flops,
      'flops_saved_fraction': 1 - kernel_flops / dense_flops,
      'flops_needed_exact': exact_flops,
      'bytes_kernel': kernel_bytes, 'bytes_dense': dense_bytes,
      'bytes_saved_fraction': 1 - kernel_bytes / dense_bytes,
  }


def _schedule_unsorted(masks, block_m, block_k):
  b, m, n = masks.shape
  rows, kp = -(-m // block_m) * block_m, -(-(n + 1) // block_k) * block_k
  padded = np.zeros((b, rows, kp), bool)
  padded[:, :m, :n] = masks
  blocks = padded.reshape(b, rows // block_m, block_m, kp // block_k, block_k).any(axis=(2, 4))
  blocks[:, :, n // block_k] = True
  return blocks


def schedule_stats():
  out = {}
  for side in GRIDS:
    masks = coco_like_masks(np.random.default_rng(side), MASKS, side)[None]
    coverage = masks.mean(axis=2)
    out[f'{side}x{side}'] = {
        'masks': MASKS, 'coverage_min_mean_max': [float(coverage.min()), float(coverage.mean()),
                                                  float(coverage.max())],
        'union_coverage': float(masks.any(axis=1).mean()),
        'by_block_size': [block_savings(masks, *blocks) for blocks in BLOCKS],
    }
  return out


def lowering():
  """(d) export the kernel for TPU and CUDA from this (CPU) machine; compile happens on device."""
  from jax.experimental.pallas import triton as pltriton
  q = jax.ShapeDtypeStruct((2, MASKS + 1 + 576, HEADS, HEAD_DIM), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((2, MASKS, 576), jnp.bool_)
  bias = jax.ShapeDtypeStruct((2, HEADS, MASKS, 576), jnp.bfloat16)
  triton_call = jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')
  cases = {
      'tpu_mosaic': (['tpu'], dict(block_q=128, block_k=128, block_m=32), (), 'tpu_custom_call'),
      'cuda_triton': (['cuda'], dict(block_q=64, block_k=64, block_m=16,
                                     compiler_params=pltriton.CompilerParams(num_warps=4)),
                      (triton_call,), 'triton'),
      'cuda_mosaic_gpu': (['cuda'], dict(block_q=64, block_k=64, block_m=16), (), 'mosaic_gpu'),
  }
  out = {}
  for name, (platforms, kw, disabled, marker) in cases.items():
    fn = jax.jit(functools.partial(ma.masked_attention, interpret=False, **kw))
    try:
      text = jax.export.export(fn, platforms=platforms, disabled_checks=disabled)(q, q, q, mask, bias).mlir_module()
      out[name] = 'lowered' if marker in text else f'lowered without a {marker} call'
    except Exception as e:  # pylint: disable=broad-except
      out[name] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}'
  return out


def accelerator_time():
  """(e) kernel vs XLA reference on the default backend, when it is a GPU or TPU."""
  backend = jax.default_backend()
  if backend not in ('gpu', 'tpu'):
    return {'skipped': f'no GPU or TPU (backend {backend}); Pallas runs only in interpret mode here'}
  params = None
  if backend == 'gpu':
    from jax.experimental.pallas import triton as pltriton
    params = pltriton.CompilerParams(num_warps=4)
  out = {'backend': backend, 'device': jax.devices()[0].device_kind,
         'note': "the kernel's backward recomputes with the XLA reference"}
  for side in GRIDS:
    q, k, v, mask, bias = _inputs(jax.random.key(4), 8, MASKS, side * side, dtype=jnp.bfloat16,
                                  masks=jnp.asarray(coco_like_masks(np.random.default_rng(side),
                                                                    8 * MASKS, side)
                                                    .reshape(8, MASKS, side * side)))
    row = {}
    # XLA cannot count a Pallas kernel's FLOPs: both are rated by the dense reference's count.
    dense = jax.jit(lambda q, k, v, b: ma.masked_attention_reference(q, k, v, mask, b))
    for name, fn in (('kernel', functools.partial(ma.masked_attention, compiler_params=params)),
                     ('xla', ma.masked_attention_reference)):
      fwd = jax.jit(lambda q, k, v, b, fn=fn: fn(q, k, v, mask, b))
      grad = jax.jit(jax.grad(lambda q, k, v, b, fn=fn: jnp.sum(fn(q, k, v, mask, b).astype(jnp.float32)),
                              argnums=(0, 1, 2, 3)))
      row[f'{name}_forward_s'] = best_time(lambda: fwd(q, k, v, bias).block_until_ready())
      row[f'{name}_forward_backward_s'] = best_time(lambda: jax.block_until_ready(grad(q, k, v, bias)))
      row[f'{name}_forward_flops'] = flops_report(dense, (q, k, v, bias), row[f'{name}_forward_s'],
                                                  dtype='bfloat16')
    out[f'{side}x{side}_batch8_bf16'] = row
  return out


# Patch-DM: 64-pixel patches, (h, C) per decoder level, on the half-patch-padded
# grid of a 1024×512 image.
COLLAGE_LEVELS = ((64, 64), (32, 128), (16, 256), (8, 512))
COLLAGE_GRID = (1024 // 64 + 1, 512 // 64 + 1)
COLLAGE_LANES_MOSAIC_GPU = 256  # Mosaic GPU copies at most 256 elements per dim


def _collage_fns(grid, batch=1, **kw):
  fns = {'kernel': functools.partial(collage_pallas.collage, grid=grid, batch=batch, **kw),
         'xla': functools.partial(collage_ref.collage, grid=grid, batch=batch)}
  grads = {name: jax.grad(lambda f, fn=fn: jnp.sum(fn(f).astype(jnp.float32) ** 2) / 2)
           for name, fn in fns.items()}
  return fns, grads


def collage_correctness():
  """(a) residuals in interpret mode: one small grid per level, and one band."""
  out = {}
  for h, c in COLLAGE_LEVELS:
    grid = (3, 4)
    f = jax.random.normal(jax.random.key(h), (2 * grid[0] * grid[1], h, h, c))
    fns, grads = _collage_fns(grid, batch=2)
    out[f'{h}x{h}x{c}_forward'] = float(jnp.abs(jax.jit(fns['kernel'])(f) - fns['xla'](f)).max())
    out[f'{h}x{h}x{c}_grad'] = float(jnp.abs(jax.jit(grads['kernel'])(f) - grads['xla'](f)).max())
  f = jax.random.normal(jax.random.key(0), (5 * 3, 8, 8, 16))
  band = functools.partial(collage_pallas.collage_band, grid=(5, 3), batch=1, start=1, rows=2)
  out['band_forward'] = float(jnp.abs(
      jax.jit(band)(f) - collage_ref.collage_band(f, (5, 3), 1, start=1, rows=2)).max())
  return out


def collage_reference_time():
  """(b) the jitted XLA reference here, per level, 1024×512 image, float32."""
  out = {'grid': list(COLLAGE_GRID)}
  for h, c in COLLAGE_LEVELS:
    f = jax.random.normal(jax.random.key(0), (COLLAGE_GRID[0] * COLLAGE_GRID[1], h, h, c))
    fns, grads = _collage_fns(COLLAGE_GRID)
    fwd, grad = jax.jit(fns['xla']), jax.jit(grads['xla'])
    out_bytes = (COLLAGE_GRID[0] - 1) * (COLLAGE_GRID[1] - 1) * h * h * c * 4
    out[f'{h}x{h}x{c}'] = {
        'forward_s': best_time(lambda: fwd(f).block_until_ready()),
        'forward_backward_s': best_time(lambda: grad(f).block_until_ready()),
        'copy_bytes_forward': 2 * out_bytes,
    }
  return out


def collage_lowering():
  """(c) export the kernel (forward and gradient) for TPU and CUDA, bf16, every level."""
  from jax.experimental.pallas import triton as pltriton
  triton_call = jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')
  cases = {
      'tpu_mosaic': (['tpu'], {}, (), 'tpu_custom_call'),
      'cuda_triton': (['cuda'], dict(compiler_params=pltriton.CompilerParams(num_warps=4)),
                      (triton_call,), 'triton'),
      'cuda_mosaic_gpu': (['cuda'], dict(block_lanes=COLLAGE_LANES_MOSAIC_GPU), (), 'mosaic_gpu'),
  }
  out = {}
  for name, (platforms, kw, disabled, marker) in cases.items():
    results = []
    for h, c in COLLAGE_LEVELS:
      f = jax.ShapeDtypeStruct((COLLAGE_GRID[0] * COLLAGE_GRID[1], h, h, c), jnp.bfloat16)
      fns, grads = _collage_fns(COLLAGE_GRID, interpret=False, **kw)
      for what, fn in (('forward', fns['kernel']), ('grad', grads['kernel'])):
        try:
          text = jax.export.export(jax.jit(fn), platforms=platforms, disabled_checks=disabled)(f).mlir_module()
          if marker not in text:
            results.append(f'{h}x{h}x{c} {what}: lowered without a {marker} call')
        except Exception as e:  # pylint: disable=broad-except
          results.append(f'{h}x{h}x{c} {what}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}')
    out[name] = results or 'lowered (forward and grad, every level)'
  out['cuda_mosaic_gpu_block_lanes'] = COLLAGE_LANES_MOSAIC_GPU
  return out


def collage_accelerator_time():
  """(d) kernel vs XLA reference on the default backend, when it is a GPU or TPU."""
  backend = jax.default_backend()
  if backend not in ('gpu', 'tpu'):
    return {'skipped': f'no GPU or TPU (backend {backend}); Pallas runs only in interpret mode here'}
  kw = {}
  if backend == 'gpu':
    from jax.experimental.pallas import triton as pltriton
    kw = dict(compiler_params=pltriton.CompilerParams(num_warps=4))
  out = {'backend': backend, 'device': jax.devices()[0].device_kind}
  for h, c in COLLAGE_LEVELS:
    f = jax.random.normal(jax.random.key(0), (8 * COLLAGE_GRID[0] * COLLAGE_GRID[1], h, h, c), jnp.bfloat16)
    fns, grads = _collage_fns(COLLAGE_GRID, batch=8, **kw)
    row = {}
    for name in ('kernel', 'xla'):
      fwd, grad = jax.jit(fns[name]), jax.jit(grads[name])
      row[f'{name}_forward_s'] = best_time(lambda: fwd(f).block_until_ready())
      row[f'{name}_forward_backward_s'] = best_time(lambda: grad(f).block_until_ready())
    out[f'{h}x{h}x{c}_batch8_bf16'] = row
  return out


def run():
  return {
      'masked_attention': {
          'residuals': correctness(),
          'reference_time_here': reference_time(),
          'block_schedule_coco_like': schedule_stats(),
          'lowering': lowering(),
          'accelerator': accelerator_time(),
      },
      'collage': {
          'residuals': collage_correctness(),
          'reference_time_here': collage_reference_time(),
          'lowering': collage_lowering(),
          'accelerator': collage_accelerator_time(),
      },
  }
