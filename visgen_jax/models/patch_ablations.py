"""The two seam-prone alternatives to feature collage of the Patch-DM paper's
ablation (its Table 4.4 / Fig. 4.8), as drop-in denoisers for the samplers.

Both run the PatchUNet with `decode='plain'`, i.e. without feature collage:
- 'independent': every step denoises the (N1+1)×(N2+1) patches of the image
  padded by half a patch, each on its own, at their trained integer positions,
  and crops the padding back off. Patch borders sit at p/2 + k·p in the image.
- 'pixel_shift': the collage done in pixel space instead of feature space —
  steps alternate between the padded grid above and the N1×N2 unshifted grid of
  the image itself (at the collage decoder's half-way positions), so borders
  move every step (at p/2 + k·p on even steps, at k·p on odd ones).
`patch_borders` says where each mode's borders are, for the seam score.
"""

import jax.numpy as jnp
import numpy as np

from visgen_jax.models.patch_unet import PatchUNet, from_patches, midpoints, to_patches

PATCH_MODES = ('collage', 'independent', 'pixel_shift')


def check_patch_mode(mode: str) -> str:
  if mode not in PATCH_MODES:
    raise ValueError(f'patch mode {mode!r} is unknown; allowed: {", ".join(PATCH_MODES)}.')
  return mode


def _plain(unet: PatchUNet, params, x, t, code, pos, keep):
  b = x.shape[0]
  out = unet.apply({'params': params}, to_patches(x, unet.patch_size), t,
                   jnp.broadcast_to(pos, (b, *pos.shape)), code, keep, decode='plain')
  return from_patches(out).astype(jnp.float32)


def independent_denoiser(unet: PatchUNet, params, pos, pos_mask):
  """denoise_fn(x, t, code, use_pos) with the padded grid's patches denoised
  independently; `pos`/`pos_mask` as for `collage_denoiser`."""
  half = unet.patch_size // 2
  pos = jnp.asarray(pos, jnp.float32)
  pos_mask = jnp.asarray(pos_mask, jnp.float32)

  def denoise(x, t, code, use_pos):
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
    keep = pos_mask[None] * jnp.asarray(use_pos, jnp.float32).reshape(-1, 1, 1)
    return _plain(unet, params, padded, t, code, pos, keep)[:, half:half + h, half:half + w]

  return denoise


def pixel_shift_denoiser(unet: PatchUNet, params, pos, pos_mask, timesteps):
  """Alternates the padded and the unshifted patch grid from step to step;
  `timesteps` are the sampling schedule's model timesteps (the step's parity is
  its index there, so every sampler alternates the same way)."""
  padded_step = independent_denoiser(unet, params, pos, pos_mask)
  mid, mid_mask = (a[0] for a in midpoints(jnp.asarray(pos, jnp.float32)[None],
                                            jnp.asarray(pos_mask, jnp.float32)[None]))
  order = jnp.sort(jnp.asarray(timesteps))

  def denoise(x, t, code, use_pos):
    keep = mid_mask[None] * jnp.asarray(use_pos, jnp.float32).reshape(-1, 1, 1)
    unshifted = _plain(unet, params, x, t, code, mid, keep)
    index = jnp.searchsorted(order, jnp.ravel(t)[0])
    return jnp.where(index % 2 == 0, padded_step(x, t, code, use_pos), unshifted)

  return denoise


def patch_borders(mode: str, size: int, patch: int) -> np.ndarray:
  """Pixel indices b (0 < b < size) where mode's patches meet between b-1 and b."""
  check_patch_mode(mode)
  unshifted = np.arange(patch, size, patch)
  padded = np.arange(patch // 2, size, patch)
  return {'collage': unshifted, 'independent': padded,
          'pixel_shift': np.union1d(unshifted, padded)}[mode]


def seam_score(images, row_borders, col_borders) -> float:
  """Mean |difference| of neighbouring pixels across patch borders over that of
  neighbouring pixels inside patches (1 = no visible seams); images [B, H, W, C]."""
  images = np.asarray(images, np.float64)
  across, inside = [], []
  for axis, borders in ((1, row_borders), (2, col_borders)):
    diff = np.abs(np.diff(images, axis=axis))  # diff index b-1 is the pair (b-1, b)
    is_border = np.zeros(diff.shape[axis], bool)
    is_border[np.asarray(borders, int) - 1] = True
    across.append(np.compress(is_border, diff, axis=axis).ravel())
    inside.append(np.compress(~is_border, diff, axis=axis).ravel())
  return float(np.concatenate(across).mean() / np.concatenate(inside).mean())
