"""Data sources and image operations behind `dig_jax.input_pipeline` (the public entry point)."""
