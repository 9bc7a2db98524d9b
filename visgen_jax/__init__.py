"""visgen_jax: controllable and efficient visual generation in JAX/Flax."""

from visgen_jax import xla_flags as _xla_flags

_xla_flags.apply_defaults()
