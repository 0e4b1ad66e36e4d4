"""dig-jax: DiG in JAX/Flax."""
