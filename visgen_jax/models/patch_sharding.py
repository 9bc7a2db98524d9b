"""Patch-DM's denoising step with the patch grid split over devices.

The half-patch-padded image of N1 output patch rows has N1 + 1 encoder patch
rows; output row i is collaged from encoder rows i and i + 1. With D devices,
device d owns R = ceil(N1 / D) output rows [dR, dR + R) and the encoder rows
of the same indices, and needs one more encoder row, dR + R: the first row of
device d + 1, of which the collage reads only the upper half of every patch.
So every device encodes its own patches, sends the upper half of its first
encoded patch row (the bottleneck and every skip connection, each at its
level) to device d - 1 with one `ppermute` per level (the halo), and decodes
its own rows from its features plus the halo. No other features cross devices; the
image itself (C channels) is split and put together around the `shard_map`
wherever XLA places it.

The images can be split too (`batch_axes`, e.g. the mesh's data axis): each
group of images is denoised by its own devices, with its own row split.

Rows that do not divide: the grid is padded with dummy rows of zeros at
masked positions, so any size works. A dummy row only feeds output rows past
N1 (each patch is encoded alone, each output row reads two encoder rows),
which are dropped. When D divides N1, encoder row N1 (the bottom padding row)
belongs to nobody: the last device encodes it itself (`lax.cond` on the
device index, so the others skip it) instead of every device taking one more
row.

Inside a device the rows can go in bands of `band_rows` (memory ~ the band,
as in `streaming_denoiser`): band k is encoded, then decoded with the first
row of band k + 1, which a `lax.scan` carries; the first band's first row is
the halo sent to the neighbour, the last band is decoded with the halo
received. The output is `collage_denoiser`'s on one device, up to float
rounding (XLA's CPU kernels may sum in another order for another number of
patches).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from visgen_jax.models.patch_unet import PatchUNet, from_patches, to_patches


def rows_per_device(rows: int, devices: int, band_rows: int = 0) -> int:
  """Output patch rows each of `devices` takes of `rows`: ceil(rows / devices),
  rounded up to whole bands of `band_rows` (0 = all at once); ValueError if a
  band is taller than a device's share."""
  share = -(-rows // devices)
  if band_rows < 0 or band_rows > share:
    raise ValueError(f'band_rows={band_rows}: each of the {devices} devices denoises {share} of the {rows} '
                     f"patch rows, so a band must be 1 … {share} rows (or 0: all of a device's rows at once).")
  band = band_rows or share
  return -(-share // band) * band


def halo_bytes(unet: PatchUNet, params, batch: int, cols: int) -> list[int]:
  """Bytes one device receives per step at every decoder level, bottleneck
  first then the skips in the order the decoder takes them: the upper half of
  one encoded patch row of `cols` patches (the padded grid's N2 + 1) for
  `batch` images.
  `params` may be arrays or their shapes."""
  p = unet.patch_size
  features = jax.eval_shape(
      lambda params, x, pos: unet.apply({'params': params}, x, jnp.zeros((batch,), jnp.int32), pos,
                                        jnp.zeros((batch, unet.code_dim)), jnp.ones((batch, 1, cols)),
                                        method=PatchUNet.encode),
      params, jax.ShapeDtypeStruct((batch, 1, cols, p, p, unet.in_channels), jnp.float32),
      jax.ShapeDtypeStruct((batch, 1, cols, 2), jnp.float32))
  bottleneck, skips = features
  return [math.prod(f.shape) // 2 * f.dtype.itemsize for f in [bottleneck, *reversed(skips)]]


def sharded_denoiser(unet: PatchUNet, params, pos, pos_mask, mesh, axes=None, band_rows: int = 0,
                     batch_axes=()):
  """`collage_denoiser` with the patch rows split over the devices of `mesh`,
  and the images over `batch_axes`.

  Args:
    unet, params, pos, pos_mask: as for `collage_denoiser` (pos [N1+1, N2+1, 2]
      and pos_mask [N1+1, N2+1] from `grid_positions`).
    mesh: a `jax.sharding.Mesh`.
    axes: the mesh axis name (or tuple of names) the rows are split over;
      default all but `batch_axes`. Axes in neither repeat the work.
    band_rows: 0 runs a device's rows at once; > 0 in bands of that many rows.
    batch_axes: the mesh axis name (or tuple) the images are split over; the
      batch must divide by their size. Each group of images has its own row
      split: halos cross only between devices of the same images.

  Returns:
    denoise_fn(x [B, H, W, C], t [B], code [B, code_dim], use_pos [B]) →
    [B, H, W, C], to be called inside `jax.jit`.
  """
  batch_axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
  axes = tuple(a for a in mesh.axis_names if a not in batch_axes) if axes is None else axes
  names = axes if isinstance(axes, tuple) else (axes,)
  unknown = [a for a in names + batch_axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f'sharded_denoiser: axes {unknown} are not in the mesh {tuple(mesh.axis_names)}.')
  if set(names) & set(batch_axes):
    raise ValueError(f'sharded_denoiser: axes {sorted(set(names) & set(batch_axes))} split both the rows '
                     'and the batch; give each mesh axis to one of them.')
  devices = math.prod(mesh.shape[a] for a in names)
  image_groups = math.prod(mesh.shape[a] for a in batch_axes)
  rows = pos.shape[0] - 1
  r = rows_per_device(rows, devices, band_rows)
  band = band_rows or r
  # The last device encodes encoder row `rows` itself when no device owns it.
  extra = devices * r == rows
  half = unet.patch_size // 2
  # Per device: its R encoder rows' positions and the halo row's (zeros, masked, past the grid).
  grid_rows = devices * r + 1
  pos_all = np.zeros((grid_rows, *pos.shape[1:]), np.float32)
  mask_all = np.zeros((grid_rows, pos.shape[1]), np.float32)
  pos_all[:rows + 1], mask_all[:rows + 1] = pos, pos_mask
  window = np.arange(devices)[:, None] * r + np.arange(r + 1)
  pos_dev = jnp.asarray(pos_all[window].reshape(devices * (r + 1), *pos.shape[1:]))
  mask_dev = jnp.asarray(mask_all[window].reshape(devices * (r + 1), pos.shape[1]))
  to_previous = [(d + 1, d) for d in range(devices - 1)]

  def apply(p, method, *args, **kwargs):
    return unet.apply({'params': p}, *args, method=method, **kwargs)

  def device_step(p, patches, extra_row, pos, keep_pos, t, code, use_pos):
    """patches [B, R, N2+1, …] (own rows), extra_row [B, 1, N2+1, …] (encoder
    row N1, used by the last device) or None, pos [R+1, N2+1, 2], keep_pos
    [R+1, N2+1] → own output rows [B, R, N2, …]."""
    b = patches.shape[0]
    grid_pos = jnp.broadcast_to(pos, (b, *pos.shape))
    keep = keep_pos[None] * use_pos.astype(jnp.float32).reshape(b, 1, 1)
    take = lambda a, start, n: jax.lax.dynamic_slice_in_dim(a, start, n, axis=1)
    encode = lambda x, start, n: apply(p, PatchUNet.encode, x, t, take(grid_pos, start, n), code,
                                       take(keep, start, n))
    # Output rows [start, start + n) from encoder rows start … start + n.
    decode = lambda features, start, n: apply(p, PatchUNet.decode, features, t, take(grid_pos, start, n + 1),
                                              code, take(keep, start, n + 1), shift=True)
    join = lambda *fs: jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *fs)
    top = lambda f: jax.tree.map(lambda a: a[:, :1], f)
    # Of the row below its last, a device's collage reads only the upper half of every patch.
    upper = lambda f: jax.tree.map(lambda a: a[:, :1, :, :a.shape[3] // 2], f)

    # Band k encodes rows [kb, kb + b) and decodes them with the next band's first row.
    current = encode(take(patches, 0, band), 0, band)
    halo = jax.tree.map(lambda f: jax.lax.ppermute(f, axes, to_previous), upper(current))
    if extra_row is not None:
      last = jax.lax.axis_index(axes) == devices - 1
      # The row is replicated; its features must be per-device like the halo they replace.
      extra_row = jax.lax.pcast(extra_row, axes, to='varying')
      halo = jax.lax.cond(last, lambda: upper(encode(extra_row, r, 1)), lambda: halo)
    halo = jax.tree.map(lambda a: jnp.pad(a, [(0, 0)] * 3 + [(0, a.shape[3])] + [(0, 0)] * 2), halo)

    outs = []
    if r > band:
      def step(current, start):
        new = encode(take(patches, start, band), start, band)
        return new, decode(join(current, top(new)), start - band, band)

      current, banded = jax.lax.scan(step, current, jnp.arange(band, r, band))
      outs.append(jnp.moveaxis(banded, 0, 1).reshape(b, r - band, *banded.shape[3:]))
    outs.append(decode(join(current, halo), r - band, band))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]

  def denoise(x, t, code, use_pos):
    if x.shape[0] % image_groups:
      raise ValueError(f'sharded_denoiser: {x.shape[0]} images do not split over the {image_groups} devices '
                       f'of the batch axes {batch_axes}.')
    dummy = max(devices * r - rows - 1, 0) * unet.patch_size
    padded = jnp.pad(x, ((0, 0), (half, half + dummy), (half, half), (0, 0)))
    patches = to_patches(padded, unet.patch_size)
    extra_row = patches[:, rows:] if extra else None
    own = patches[:, :devices * r]
    images = batch_axes or None
    out = jax.shard_map(
        device_step, mesh=mesh,
        in_specs=(P(), P(images, axes), P(images), P(axes), P(axes), P(images), P(images), P(images)),
        out_specs=P(images, axes))(params, own, extra_row, pos_dev, mask_dev, t, code, use_pos)
    return from_patches(out[:, :rows]).astype(jnp.float32)

  return denoise
