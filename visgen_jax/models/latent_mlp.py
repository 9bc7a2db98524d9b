"""The latent DPM over global codes: its denoiser, an MLP with skip connections
(Diff-AE's MLPSkipNet, which Patch-DM reuses to sample its semantic codes), its
loss (`latent_loss`) and its sampler (`sample_codes`).

Structure, as in the public Patch-DM code (facts, not its code):
  cond = Linear(SiLU(Linear(sinusoid(t, 64))))             width code_dim
  layer k < L-1: h = Linear([h ‖ x] if k ≥ 1 else x)        width hidden
                 h = SiLU(LayerNorm(h · (1 + Linear(SiLU(cond)))))
  layer L-1:     out = Linear([h ‖ x])                      width code_dim
i.e. the noisy input x is concatenated to the input of every layer after the
first, the time scales (no shift) each hidden layer before its LayerNorm, and
the last layer is linear. Hidden and time-scale Linears use Kaiming-normal
weights. The output is ε (the public code's latent DPM predicts the noise).
Paper scale: 10 layers, hidden 2048, a 512-d code.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from visgen_jax.diffusion import losses, samplers
from visgen_jax.nn.layers import dense, timestep_embedding

# Kaiming normal for a ReLU-like gain (PyTorch's kaiming_normal_, fan_in).
_kaiming = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class LatentMLP(nn.Module):
  """x [B, code_dim] (noisy codes), t [B] (timesteps) → ε̂ [B, code_dim]."""
  code_dim: int = 512
  num_layers: int = 10
  hidden: int = 2048
  time_channels: int = 64
  condition_bias: float = 1.0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, t, *, train: bool = False):
    if self.num_layers < 2:
      raise ValueError(f'LatentMLP num_layers={self.num_layers}; it needs at least 2 (hidden + output).')
    if x.ndim != 2 or x.shape[-1] != self.code_dim:
      raise ValueError(f'LatentMLP input has shape {x.shape}; expected [B, {self.code_dim}].')
    x = jnp.asarray(x, jnp.float32)
    cond = timestep_embedding(t, self.time_channels)
    cond = dense(self.code_dim, name='time_embed_1')(nn.silu(dense(self.code_dim, name='time_embed_0')(cond)))
    h = x
    for k in range(self.num_layers - 1):
      if k:
        h = jnp.concatenate([h, x], axis=-1)
      h = nn.Dense(self.hidden, kernel_init=_kaiming, name=f'layer_{k}')(h)
      scale = nn.Dense(self.hidden, kernel_init=_kaiming, name=f'layer_{k}_time')(nn.silu(cond))
      h = nn.LayerNorm(epsilon=1e-5, name=f'layer_{k}_norm')(h * (self.condition_bias + scale))
      h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    return dense(self.code_dim, name=f'layer_{self.num_layers - 1}')(jnp.concatenate([h, x], axis=-1))


def code_stats(codes, znormalize: bool):
  """Per-dimension (mean, std) that z-normalise the code table for the latent
  DPM (constant, not trained through), or (0, 1)."""
  if not znormalize:
    return 0.0, 1.0
  codes = jax.lax.stop_gradient(codes)
  return codes.mean(axis=0), codes.std(axis=0, ddof=1)


def latent_loss(latent: LatentMLP, schedule, latent_params, codes, key, *, batch_size: int | None,
                loss_type: str = 'l1', znormalize: bool = True):
  """Per-row loss [batch_size] of the latent DPM on random rows of the code
  table, or [len(codes)] on every row (batch_size None, e.g. a batch's encoder
  codes); no gradient reaches the codes."""
  rows_key, loss_key, dropout_key = jax.random.split(key, 3)
  mean, std = code_stats(codes, znormalize)
  if batch_size is not None:
    codes = codes[jax.random.randint(rows_key, (batch_size,), 0, codes.shape[0])]
  picked = jax.lax.stop_gradient(codes)
  model = lambda z_t, t: latent.apply({'params': latent_params}, z_t, t, train=True, rngs={'dropout': dropout_key})
  return losses.diffusion_loss(schedule, model, (picked - mean) / std, loss_key, loss_type=loss_type)[0]


def sample_codes(latent: LatentMLP, schedule, latent_params, codes, key, n: int, *, znormalize: bool = True):
  """n new codes [n, code_dim] by DDIM (η = 0, no clipping) on `schedule`
  (respaced), mapped back to the table's scale."""
  noise_key, key = jax.random.split(key)
  mean, std = code_stats(codes, znormalize)
  denoise = lambda z, t: latent.apply({'params': latent_params}, z, t)
  z = samplers.ddim(key, denoise, schedule, jax.random.normal(noise_key, (n, latent.code_dim)),
                    clip_denoised=False)
  return z * std + mean
