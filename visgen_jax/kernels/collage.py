"""Patch-DM's feature collage (Eq. 4.5–4.7), the plain-jnp reference.

Features of a grid of patches [B·P1·P2, h, w, C] (row-major over the grid)
are re-assembled into one map [B, P1·h, P2·w, C], shifted by half a patch
(h/2, w/2) and re-split: the result is the (P1-1)×(P2-1) grid of patches that
straddle four neighbours. It is a pure copy (a gather of crops), so its
adjoint — scattering gradients back to the four source patches — comes from
autodiff. `collage_band` collages a band of rows from only the patch rows it
reads, which is what a streaming sampler keeps in memory.
"""

import einops

from visgen_jax.errors import UserError


def _check(features, grid, batch):
  p1, p2 = grid
  if p1 < 2 or p2 < 2:
    raise UserError(f'collage: grid {tuple(grid)} needs at least 2 patches per axis.')
  n, h, w, _ = features.shape
  if n != batch * p1 * p2:
    raise UserError(f'collage: {n} patches do not form batch {batch} x grid {p1}x{p2}.')
  if h % 2 or w % 2:
    raise UserError(f'collage: patch features of {h}x{w} cannot shift by half a patch; '
                    'use patch sizes whose feature maps stay even at every UNet level.')


def assemble(patches, grid, batch):
  """[B·P1·P2, h, w, C] → [B, P1·h, P2·w, C]."""
  return einops.rearrange(patches, '(b p1 p2) h w c -> b (p1 h) (p2 w) c', b=batch, p1=grid[0], p2=grid[1])


def split(image, patch_hw):
  """[B, P1·h, P2·w, C] → [B·P1·P2, h, w, C]."""
  return einops.rearrange(image, 'b (p1 h) (p2 w) c -> (b p1 p2) h w c', h=patch_hw[0], w=patch_hw[1])


def collage(features, grid, batch):
  """Half-patch-shifted patches [B·(P1-1)·(P2-1), h, w, C] of a patch grid."""
  _check(features, grid, batch)
  _, h, w, _ = features.shape
  whole = assemble(features, grid, batch)
  return split(whole[:, h // 2:whole.shape[1] - h // 2, w // 2:whole.shape[2] - w // 2], (h, w))


def collage_band(features, grid, batch, start: int, rows: int):
  """Rows [start, start + rows) of `collage(features, grid, batch)`.

  Reads only patch rows start … start + rows of the grid (one extra row: the
  lower neighbours), so a band costs memory proportional to its width.
  """
  p1, p2 = grid
  if not 0 <= start < start + rows <= p1 - 1:
    raise UserError(f'collage_band: rows [{start}, {start + rows}) are outside the {p1 - 1} '
                    'collaged rows of the grid.')
  _check(features, grid, batch)
  per_image = einops.rearrange(features, '(b p1 p2) h w c -> b p1 p2 h w c', b=batch, p1=p1, p2=p2)
  band = per_image[:, start:start + rows + 1]
  band = einops.rearrange(band, 'b p1 p2 h w c -> (b p1 p2) h w c')
  return collage(band, (rows + 1, p2), batch)
