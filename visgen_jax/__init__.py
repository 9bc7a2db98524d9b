"""visgen_jax: controllable and efficient visual generation in JAX/Flax."""
