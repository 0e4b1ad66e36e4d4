"""pallas_kernels: fused kernels for dig-jax, usable on their own (they import nothing from dig_jax)."""
