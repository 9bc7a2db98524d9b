"""Patch-DM's feature collage as one Pallas gather, beside the jnp reference
(`visgen_jax.kernels.collage`).

Output patch (i, j) of the collage is made of four quadrants, each a copy of
the opposite quadrant of a neighbour: quadrant (qy, qx) ∈ {0, 1}² of output
(i, j) is quadrant (1 - qy, 1 - qx) of input (i + qy, j + qx). The kernel is
that rule with a grid offset (r0, c0):

  out(i, j)[qy, qx] = in(i + qy + r0, j + qx + c0)[1 - qy, 1 - qx], or 0 where
  the source patch lies outside the input grid,

one grid step per output quadrant, a pure copy. The full collage is offset
(0, 0); a band of rows [start, start + rows) is offset (start, 0), read in
place without slicing the features first.

Adjoint: every input quadrant feeds at most one output quadrant, so the
scatter-add of the backward pass is itself a gather of the same form. Input
(p, q)[a, e] went to output (p - 1 + a - r0, q - 1 + e - c0)[1 - a, 1 - e],
so the cotangent of the input grid is this gather applied to the output
cotangent with offset (-1 - r0, -1 - c0), zero at the half-patch border that
no output reads. Being the same primitive, it is differentiable again.

Layout: [N, h, w, C] is viewed (a free reshape) as [B, P1, P2, 2, h/2, w·C],
so a quadrant block is (h/2, w·C/2): its second-minor dim is a whole array
dim and no in-kernel slicing is needed. On TPU (Mosaic) w·C/2 must be a
multiple of 128 (true for Patch-DM's ≥ 64 channels and ≥ 8-pixel features);
on GPU (Triton) h/2 and the block's columns must be powers of two; Mosaic GPU
copies at most 256 per dim and needs `block_lanes` (e.g. 256) on real sizes.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from visgen_jax.errors import UserError
from visgen_jax.kernels import collage as reference

IMPLS = ('xla', 'pallas')


def _copy_kernel(x_ref, o_ref, *, offset, source_grid, masked):
  if not masked:
    o_ref[...] = x_ref[...]
    return
  i = pl.program_id(1) + pl.program_id(3) + offset[0]
  j = pl.program_id(2) + pl.program_id(4) + offset[1]
  inside = (i >= 0) & (i < source_grid[0]) & (j >= 0) & (j < source_grid[1])
  x = x_ref[...]
  o_ref[...] = jnp.where(inside, x, jnp.zeros_like(x))


def _gather(x, out_grid, offset, lanes, interpret, compiler_params):
  """x [B, S1, S2, 2, h/2, w·C] → [B, Q1, Q2, 2, h/2, w·C] by the module's rule,
  each quadrant copied in chunks of `lanes` of its w·C/2 columns."""
  b, s1, s2, _, hh, wc = x.shape
  chunks = wc // 2 // lanes
  q1, q2 = out_grid
  r0, c0 = offset
  # Source rows span r0 … Q1 + r0 (likewise columns): mask only if that leaves the grid.
  masked = not (r0 >= 0 and q1 + r0 < s1 and c0 >= 0 and q2 + c0 < s2)
  clamp = (lambda v, n: jnp.clip(v, 0, n - 1)) if masked else (lambda v, n: v)

  def source(bi, i, j, qy, qx, k):
    return bi, clamp(i + qy + r0, s1), clamp(j + qx + c0, s2), 1 - qy, 0, (1 - qx) * chunks + k

  block = (None, None, None, None, hh, lanes)
  kernel = functools.partial(_copy_kernel, offset=offset, source_grid=(s1, s2), masked=masked)
  return pl.pallas_call(
      kernel, grid=(b, q1, q2, 2, 2, chunks),
      in_specs=[pl.BlockSpec(block, source)],
      out_specs=pl.BlockSpec(block, lambda bi, i, j, qy, qx, k: (bi, i, j, qy, 0, qx * chunks + k)),
      out_shape=jax.ShapeDtypeStruct((b, q1, q2, 2, hh, wc), x.dtype),
      interpret=interpret, compiler_params=compiler_params, name='patchdm_feature_collage')(x)


# The input grid is an argument (not read from x) because the backward pass needs it.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5, 6))
def _shift_gather(x, in_grid, out_grid, offset, lanes, interpret, compiler_params):
  del in_grid
  return _gather(x, out_grid, offset, lanes, interpret, compiler_params)


def _shift_gather_fwd(x, in_grid, out_grid, offset, lanes, interpret, compiler_params):
  del in_grid
  return _gather(x, out_grid, offset, lanes, interpret, compiler_params), None


def _shift_gather_bwd(in_grid, out_grid, offset, lanes, interpret, compiler_params, _, g):
  back = (-1 - offset[0], -1 - offset[1])
  return (_shift_gather(g, out_grid, in_grid, back, lanes, interpret, compiler_params),)


_shift_gather.defvjp(_shift_gather_fwd, _shift_gather_bwd)


def _collage_rows(features, grid, batch, start, rows, block_lanes, interpret, compiler_params):
  reference._check(features, grid, batch)  # pylint: disable=protected-access
  p1, p2 = grid
  _, h, w, c = features.shape
  lanes = w * c // 2 if block_lanes is None else block_lanes
  if not isinstance(lanes, int) or lanes < 1 or (w * c // 2) % lanes:
    raise UserError(f'collage block_lanes={block_lanes!r} must be a positive int dividing '
                    f'w·C/2 = {w * c // 2} (half a patch row of {w}x{c} features).')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  x = features.reshape(batch, p1, p2, 2, h // 2, w * c)
  out = _shift_gather(x, (p1, p2), (rows, p2 - 1), (start, 0), lanes, interpret, compiler_params)
  return out.reshape(batch * rows * (p2 - 1), h, w, c)


def collage(features, grid, batch, *, block_lanes=None, interpret=None, compiler_params=None):
  """`visgen_jax.kernels.collage.collage` as one Pallas gather (same result, bit for bit).

  Args:
    features: [B·P1·P2, h, w, C], row-major over the patch grid; h and w even.
    grid: (P1, P2), each ≥ 2.
    batch: B.
    block_lanes: copy each quadrant in chunks of this many of its w·C/2
      columns; default: whole (Mosaic GPU needs ≤ 256 and fewer bytes in flight).
    interpret: run in Pallas interpret mode; default: on CPU only.
    compiler_params: passed to `pallas_call` (e.g. Triton's on GPU).

  Returns:
    [B·(P1-1)·(P2-1), h, w, C], the patches shifted by half a patch.
  """
  return _collage_rows(features, grid, batch, 0, grid[0] - 1, block_lanes, interpret,
                       compiler_params)


def collage_band(features, grid, batch, start: int, rows: int, *, block_lanes=None,
                 interpret=None, compiler_params=None):
  """Rows [start, start + rows) of `collage(features, grid, batch)`, gathered
  straight from the full grid (`visgen_jax.kernels.collage.collage_band`)."""
  if not 0 <= start < start + rows <= grid[0] - 1:
    raise UserError(f'collage_band: rows [{start}, {start + rows}) are outside the {grid[0] - 1} '
                    'collaged rows of the grid.')
  return _collage_rows(features, grid, batch, start, rows, block_lanes, interpret,
                       compiler_params)


def select(impl: str):
  """The collage function `(features, grid, batch) → patches` named by `impl`."""
  if impl not in IMPLS:
    raise UserError(f'collage_impl={impl!r} is unknown; allowed: {", ".join(IMPLS)}.')
  return reference.collage if impl == 'xla' else collage
