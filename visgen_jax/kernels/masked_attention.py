"""MaskCLIP's masked attention as a blocked Pallas kernel, beside its jnp reference.

Tokens are laid out [M mask tokens | class token | N patch tokens] (T = M + 1 + N).
The mask of MaskCLIP (Eq. 2.1) is mostly fixed:
  - no token attends to a mask token (not even the mask token itself);
  - every token attends to the class token;
  - class and patch tokens attend to every patch;
  - mask token m attends to patch n iff `mask[b, m, n]`,
and RMA adds a logit bias [B, H, M, N] on the mask-token × patch block only.

The kernel takes just the compact `mask` and `bias`; the fixed part comes from
token positions. Keys of mask tokens are never visited, so the kernel runs over
the 1 + N keys reordered as [N patches | class | padding] (the mask's columns
then line up with key columns and need no shift). Queries split into two
launches of one kernel: mask-token rows (masked, biased, block-skipping) and
class/patch rows (dense over the 1 + N keys). In the masked launch a key block
is visited only if some query of the block sees some patch of it or it holds
the class key; because the class key is always visible every row has a finite
maximum and an empty mask cannot produce NaN. Lengths are padded to the block
sizes and padded keys are masked by position.

Mask tokens do not see each other, so their rows are independent: the masked
launch processes them sorted by their mask's centroid (and un-sorts the output),
which groups masks over nearby patches into one query block and lets far more
key blocks be skipped than the model's arbitrary order would (0 % → 15–45 % of
the mask rows' blocks for COCO-like masks, see the bench).

Backward: `jax.custom_vjp` whose backward pass recomputes with the dense jnp
reference (XLA), i.e. it is not blocked and holds [B, H, T, T] logits.

Lowering (checked with `jax.export` on a CPU-only machine, see the bench):
TPU via Mosaic and CUDA via the Triton backend of `pallas_call`. Mosaic GPU's
`pallas_call` path rejects this kernel (no `dot_general` in its lane-level
lowering). On TPU, use block_q % 8 == 0 and block_k % 128 == 0; on GPU (Triton)
block sizes and the head dim must be powers of two.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from visgen_jax.errors import UserError

# Finite stand-in for -inf: a row whose visited keys are all masked so far keeps
# m = _NEG and accumulates junk that the first visible key (the class key is
# always visible) scales by exp(_NEG - m) = 0.
_NEG = -1e30


def _check(q, k, v, mask, bias):
  if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise UserError(f'masked attention needs q, k [B, T, H, D] of one shape and v [B, T, H, Dv]; '
                    f'got q {q.shape}, k {k.shape}, v {v.shape}.')
  b, t, h, _ = q.shape
  if mask.ndim != 3 or mask.shape[0] != b or mask.shape[1] + 1 + mask.shape[2] != t:
    raise UserError(f'masked attention mask must be [B, M, N] with M + 1 + N = T = {t} tokens '
                    f'(layout [mask tokens | class | patches]); got {mask.shape}.')
  if bias is not None and bias.shape != (b, h, mask.shape[1], mask.shape[2]):
    raise UserError(f'masked attention bias must be [B, H, M, N] = '
                    f'{(b, h, mask.shape[1], mask.shape[2])}; got {bias.shape}.')


def dense_mask(mask):
  """[B, M, N] patch visibility → the full [B, T, T] bool mask of Eq. 2.1 (True = may attend)."""
  b, m, n = mask.shape
  t = m + 1 + n
  rows = jnp.arange(t)[:, None]
  cols = jnp.arange(t)[None, :]
  patches = jnp.pad(mask.astype(bool), ((0, 0), (0, 1 + n), (m + 1, 0)))
  # No one sees mask tokens; all see the class; class and patches see all patches.
  return (cols >= m) & ((rows >= m) | (cols == m) | patches)


def masked_attention_reference(q, k, v, mask, bias=None, *, scale=None):
  """Plain-jnp reference: the dense mask and bias through `jax.nn.dot_product_attention`.

  Args:
    q, k: [B, T, H, D], tokens laid out [M mask tokens | class | N patches].
    v: [B, T, H, Dv].
    mask: [B, M, N] bool; True where mask token m may see patch n.
    bias: optional [B, H, M, N] additive logits for the mask-token × patch block.
    scale: logit scale; default 1/sqrt(D).

  Returns:
    [B, T, H, Dv] in q's dtype.
  """
  _check(q, k, v, mask, bias)
  m, n = mask.shape[1:]
  full_bias = None
  if bias is not None:
    full_bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1 + n), (m + 1, 0)))
  return jax.nn.dot_product_attention(q, k, v, bias=full_bias, mask=dense_mask(mask)[:, None],
                                      scale=scale, implementation='xla')


def _attention_kernel(*refs, block_k, num_k_blocks, num_patches, masked, has_bias):
  """One (batch, head, query block): online softmax over the visited key blocks."""
  q_ref, k_ref, v_ref = refs[:3]
  mask_ref = refs[3] if masked else None
  bias_ref = refs[4] if has_bias else None
  o_ref = refs[-1]
  q = q_ref[...]
  block_q, dv = q.shape[0], v_ref.shape[-1]

  def visit(start, carry):
    m_prev, l_prev, acc = carry
    keys = pl.ds(start, block_k)
    s = jax.lax.dot_general(q, k_ref[keys, :], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    col = start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    if masked:
      if has_bias:
        s = s + bias_ref[:, keys].astype(jnp.float32)
      visible = (mask_ref[:, keys] != 0) | (col == num_patches)
    else:
      visible = col <= num_patches  # class and patch keys; the rest is padding
    s = jnp.where(visible, s, _NEG)
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_new = alpha * l_prev + p.sum(axis=1, keepdims=True)
    v = v_ref[keys, :]
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc + pv

  def body(kb, carry):
    start = pl.multiple_of(kb * block_k, block_k)
    if not masked:
      return visit(start, carry)
    # Skip the block when no query in it sees any of its patches and it lacks the class key.
    sees_patch = jnp.max(mask_ref[:, pl.ds(start, block_k)].astype(jnp.int32)) > 0
    has_class = (start <= num_patches) & (num_patches < start + block_k)
    return jax.lax.cond(sees_patch | has_class, functools.partial(visit, start), lambda c: c, carry)

  init = (jnp.full((block_q, 1), _NEG, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros((block_q, dv), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, num_k_blocks, body, init)
  o_ref[...] = (acc / l).astype(o_ref.dtype)


def _pad_to(x, axis, size):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _launch(q, k, v, mask, bias, *, num_patches, block_q, block_k, interpret, compiler_params):
  """q [B, H, Tq, D] (Tq % block_q == 0), k/v [B, H, Kp, D], mask [B, Tq, Kp] int8 or None."""
  b, h, tq, d = q.shape
  kp, dv = k.shape[2], v.shape[3]
  masked, has_bias = mask is not None, bias is not None
  kernel = functools.partial(_attention_kernel, block_k=block_k, num_k_blocks=kp // block_k,
                             num_patches=num_patches, masked=masked, has_bias=has_bias)
  # K/V (and mask/bias rows) stay whole per (batch, head): consecutive query
  # blocks reuse them without a new copy, and the kernel slices the key blocks it visits.
  in_specs = [pl.BlockSpec((None, None, block_q, d), lambda bi, hi, qi: (bi, hi, qi, 0)),
              pl.BlockSpec((None, None, kp, d), lambda bi, hi, qi: (bi, hi, 0, 0)),
              pl.BlockSpec((None, None, kp, dv), lambda bi, hi, qi: (bi, hi, 0, 0))]
  args = [q, k, v]
  if masked:
    in_specs.append(pl.BlockSpec((None, block_q, kp), lambda bi, hi, qi: (bi, qi, 0)))
    args.append(mask)
  if has_bias:
    in_specs.append(pl.BlockSpec((None, None, block_q, kp), lambda bi, hi, qi: (bi, hi, qi, 0)))
    args.append(bias)
  return pl.pallas_call(
      kernel, grid=(b, h, tq // block_q), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, block_q, dv), lambda bi, hi, qi: (bi, hi, qi, 0)),
      out_shape=jax.ShapeDtypeStruct((b, h, tq, dv), q.dtype), interpret=interpret,
      compiler_params=compiler_params, name='maskclip_masked_attention')(*args)


def mask_order(mask):
  """[B, M] order of the mask tokens by the centroid of their patch indices (empty ones first)."""
  mask = jnp.asarray(mask, bool)
  index = jnp.arange(mask.shape[2], dtype=jnp.float32)
  count = jnp.maximum(mask.sum(axis=2), 1).astype(jnp.float32)
  return jnp.argsort(jnp.where(mask, index, 0).sum(axis=2) / count, axis=1, stable=True)


def _forward(q, k, v, mask, bias, scale, block_q, block_k, block_m, interpret, compiler_params):
  m, n = mask.shape[1:]
  root = math.sqrt(scale)
  # [B, T, H, D] → [B, H, T, D]; the scale is split over q and k as in nn.attention.
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * root, k * root, v))
  kp = -(-(n + 1) // block_k) * block_k
  keys = lambda x: _pad_to(jnp.concatenate([x[:, :, m + 1:], x[:, :, m:m + 1]], axis=2), 2, kp)
  k, v = keys(k), keys(v)
  launch = functools.partial(_launch, num_patches=n, block_k=block_k,
                             interpret=interpret, compiler_params=compiler_params)
  rows_img = -(-(n + 1) // block_q) * block_q
  out_img = launch(_pad_to(q[:, :, m:], 2, rows_img), k, v, None, None,
                   block_q=block_q)[:, :, :n + 1]
  if m == 0:
    return jnp.swapaxes(out_img, 1, 2)
  order = mask_order(mask)
  rows_mask = -(-m // block_m) * block_m

  def rows(x, axis):  # sorted mask-token rows of x along `axis`, padded to the block
    order_x = jnp.expand_dims(order, tuple(i for i in range(x.ndim) if i not in (0, axis)))
    return _pad_to(jnp.take_along_axis(x, order_x, axis=axis), axis, rows_mask)

  mask_p = _pad_to(rows(mask.astype(jnp.int8), 1), 2, kp)
  bias_p = None if bias is None else _pad_to(rows(bias, 2), 3, kp)
  out_mask = launch(rows(q[:, :, :m], 2), k, v, mask_p, bias_p, block_q=block_m)[:, :, :m]
  out_mask = jnp.take_along_axis(out_mask, jnp.argsort(order, axis=1)[:, None, :, None], axis=2)
  return jnp.swapaxes(jnp.concatenate([out_mask, out_img], axis=2), 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _masked_attention(q, k, v, mask, bias, scale, block_q, block_k, block_m, interpret,
                      compiler_params):
  return _forward(q, k, v, mask, bias, scale, block_q, block_k, block_m, interpret,
                  compiler_params)


def _masked_attention_fwd(q, k, v, mask, bias, scale, block_q, block_k, block_m, interpret,
                          compiler_params):
  out = _forward(q, k, v, mask, bias, scale, block_q, block_k, block_m, interpret,
                 compiler_params)
  return out, (q, k, v, mask, bias)


def _masked_attention_bwd(scale, block_q, block_k, block_m, interpret, compiler_params, res, g):
  del block_q, block_k, block_m, interpret, compiler_params
  q, k, v, mask, bias = res
  ref = lambda q, k, v, bias: masked_attention_reference(q, k, v, mask, bias, scale=scale)
  dq, dk, dv, dbias = jax.vjp(ref, q, k, v, bias)[1](g)
  return dq, dk, dv, np.zeros(mask.shape, jax.dtypes.float0), dbias


_masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)


def masked_attention(q, k, v, mask, bias=None, *, scale=None, block_q=128, block_k=128,
                     block_m=32, interpret=None, compiler_params=None):
  """MaskCLIP attention (Eq. 2.1, plus RMA's bias) with the Pallas kernel.

  Args:
    q, k: [B, T, H, D], tokens laid out [M mask tokens | class | N patches].
    v: [B, T, H, Dv].
    mask: [B, M, N] bool; True where mask token m may see patch n.
    bias: optional [B, H, M, N] additive logits for the mask-token × patch block.
    scale: logit scale; default 1/sqrt(D).
    block_q, block_k: query (class and patch rows) / key block sizes (see the module
      note for TPU/GPU constraints).
    block_m: query block size of the mask-token rows; small blocks skip more.
    interpret: run the kernel in Pallas interpret mode; default: on CPU only.
    compiler_params: passed to `pallas_call`, e.g.
      `jax.experimental.pallas.triton.CompilerParams()` to select Triton on GPU.

  Returns:
    [B, T, H, Dv] in q's dtype; equal to `masked_attention_reference`.
  """
  _check(q, k, v, mask, bias)
  mask = jnp.asarray(mask, bool)
  for name, size in (('block_q', block_q), ('block_k', block_k), ('block_m', block_m)):
    if not isinstance(size, int) or size < 1:
      raise UserError(f'masked attention {name}={size!r} must be a positive int.')
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  return _masked_attention(q, k, v, mask, bias, float(scale), block_q, block_k, block_m,
                           interpret, compiler_params)


def block_schedule(mask, block_m, block_k):
  """Which (mask-token query block, key block) pairs the masked launch visits, in numpy.

  Args:
    mask: [B, M, N] bool, in the model's order.
    block_m, block_k: the kernel's block sizes.

  Returns:
    [B, ceil(M / block_m), ceil((N + 1) / block_k)] bool; the kernel's order and rule.
  """
  mask = np.take_along_axis(np.asarray(mask, bool), np.asarray(mask_order(mask))[:, :, None], 1)
  b, m, n = mask.shape
  rows, kp = -(-m // block_m) * block_m, -(-(n + 1) // block_k) * block_k
  padded = np.zeros((b, rows, kp), bool)
  padded[:, :m, :n] = mask
  blocks = padded.reshape(b, rows // block_m, block_m, kp // block_k, block_k).any(axis=(2, 4))
  blocks[:, :, n // block_k] = True  # the block holding the class key
  return blocks
