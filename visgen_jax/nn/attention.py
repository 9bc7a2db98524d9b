"""The one attention entry point, so a fused kernel can replace it by name.

Every model calls `dot_product_attention`; `impl` picks the implementation. Only
'xla' (plain jnp, any backend) exists for now.
"""

import math

import jax
import jax.numpy as jnp

from visgen_jax.errors import UserError

IMPLS = ('xla',)


def dot_product_attention(q, k, v, bias=None, mask=None, impl='xla', *, scale=None):
  """softmax(q·kᵀ·scale + bias, masked) · v over the token axis.

  Args:
    q: [B, Tq, H, D] queries.
    k: [B, Tk, H, D] keys.
    v: [B, Tk, H, Dv] values.
    bias: optional additive logits, broadcastable to [B, H, Tq, Tk].
    mask: optional bool, broadcastable to [B, H, Tq, Tk]; True = may attend.
    impl: implementation name, one of `IMPLS`.
    scale: logit scale; default 1/sqrt(D).

  Returns:
    [B, Tq, H, Dv] in v's dtype.

  The scale is split as sqrt(scale) on q and on k before the product (as
  guided_diffusion does) so that low-precision logits stay in range; the softmax
  runs in float32.
  """
  if impl not in IMPLS:
    raise UserError(f'attention impl={impl!r} is unknown; allowed: {", ".join(IMPLS)}.')
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  root = math.sqrt(scale)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * root, k * root)
  logits = logits.astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)
