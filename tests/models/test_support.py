"""Shared helpers for the model tests (this module has no tests): tiny configs, models, jitted apply.

Models are created eagerly: every initializer compiles once per parameter shape and the tiny configs share
their shapes, so after the first model the others are nearly free (a jitted init compiles once per config
instead). Forward passes run under jax.jit, keyed on the (hashable) graphdef.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dig_jax.models import create_model, model_config_for

TINY = dict(depth=1, hidden_size=64, num_heads=2, input_size=8, num_classes=10)


def tiny_config(arch: str = "dig", **overrides):
  fields = dict(TINY)
  fields.update(overrides)
  return model_config_for("DiG-S/2" if arch == "dig" else "DiT-S/2", **fields)


def build(cfg, seed: int = 0):
  return create_model(cfg, rngs=nnx.Rngs(seed))


def randomize_zero_params(model, seed: int = 0, scale: float = 0.2):
  """Replaces every all-zero Param (adaLN-Zero, final layer, biases) by N(0, scale^2) values, in place."""
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param) and not np.any(np.asarray(node.get_value())):
      node.set_value(jnp.asarray(scale * rng.normal(size=node.get_value().shape), jnp.float32))
  return model


@functools.partial(jax.jit, static_argnums=(0,))
def _apply(graphdef, state, x, t, y, label_drop_rng):
  return nnx.merge(graphdef, state)(x, t, y, label_drop_rng=label_drop_rng)


def apply(model, x, t, y, label_drop_rng=None):
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, x, t, y, label_drop_rng)


def normal(seed, shape):
  """N(0, 1) float32 test inputs, drawn with NumPy: an eager jax.random draw compiles once per new shape (a
  few tenths of a second each on a 2-core CPU)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def inputs(cfg, batch: int = 2, seed: int = 0):
  """Random NHWC latents, float timesteps and labels for a config (float32, float32, int32 arrays), drawn with
  NumPy (see `normal`)."""
  h, w = (cfg.input_size, cfg.input_size) if isinstance(cfg.input_size, int) else cfg.input_size
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, h, w, cfg.in_channels)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 999, (batch,)), jnp.float32)
  y = jnp.asarray(rng.integers(0, cfg.num_classes, (batch,)), jnp.int32)
  return x, t, y
