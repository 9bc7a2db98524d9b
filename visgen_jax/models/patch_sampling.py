"""The Patch-DM denoiser a sampler runs, by option: feature collage on all
patch rows at once (`collage_denoiser`), in bands of rows (`stream_rows`,
`streaming_denoiser`), with the rows split over devices (`mesh`,
`sharded_denoiser`), or one of the seam ablation's patch modes
(patch_ablations)."""

from visgen_jax.models.patch_ablations import check_patch_mode, independent_denoiser, pixel_shift_denoiser
from visgen_jax.models.patch_sharding import sharded_denoiser
from visgen_jax.models.patch_unet import PatchUNet, collage_denoiser, streaming_denoiser


def check_options(patch_mode: str, stream_rows: int, shard_rows: bool):
  """ValueError unless the options go together (the ablations are neither
  streamed nor sharded)."""
  check_patch_mode(patch_mode)
  if stream_rows < 0:
    raise ValueError(f'stream_rows={stream_rows} must be 0 (all patch rows at once) or a band height in '
                     'patch rows.')
  if stream_rows and patch_mode != 'collage':
    raise ValueError(f'stream_rows streams the feature collage; patch_mode={patch_mode!r} is an unstreamed '
                     'ablation: set one of them to its default.')
  if shard_rows and patch_mode != 'collage':
    raise ValueError(f'shard_rows splits the feature collage over devices; patch_mode={patch_mode!r} is an '
                     'ablation on one device: set one of them to its default.')


def patch_denoiser(unet: PatchUNet, params, pos, pos_mask, *, patch_mode: str = 'collage', stream_rows: int = 0,
                   mesh=None, batch_axes=(), timesteps=None):
  """denoise_fn(x, t, code, use_pos) for the samplers (see `collage_denoiser`);
  with a `mesh`, the rows go over its 'model' axis and the images over
  `batch_axes`; `timesteps` (the sampling schedule's) for 'pixel_shift'."""
  if mesh is not None:
    return sharded_denoiser(unet, params, pos, pos_mask, mesh, 'model', stream_rows, batch_axes)
  if stream_rows:
    return streaming_denoiser(unet, params, pos, pos_mask, stream_rows)
  if patch_mode == 'independent':
    return independent_denoiser(unet, params, pos, pos_mask)
  if patch_mode == 'pixel_shift':
    return pixel_shift_denoiser(unet, params, pos, pos_mask, timesteps)
  return collage_denoiser(unet, params, pos, pos_mask)
