"""DiG and DiT as Flax NNX modules (exactly as the official hustvl/DiG code builds them; NHWC layout).

Public API:
  model_config_for(name, **overrides) -> ConfigDict     e.g. "DiG-S/2", "DiG-XL/2", "DiT-B/4"
  create_model(model_config, *, rngs) -> DiG | DiT
  model(x, t, y, *, label_drop_rng=None), model.forward_with_cfg(x, t, y, cfg_scale)
  count_params(model_or_abstract_state, include_pos_embed=True), logical_axis_names(model_or_state)
"""
from __future__ import annotations

import ml_collections
from flax import nnx

from dig_jax.models.backbone import DiffusionBackbone
from dig_jax.models.configs import model_config_for, resolve_model_config
from dig_jax.models.dig import DiG
from dig_jax.models.dit import DiT
from dig_jax.models.partitioning import (LOGICAL_AXIS_NAMES, SinCosPosEmbed, count_params,
                                         logical_axis_names)


def create_model(model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> DiffusionBackbone:
  """Builds DiG or DiT from a model config (checked by `resolve_model_config`; zero sizes from the table)."""
  cfg = resolve_model_config(model_config)
  return DiG(cfg, rngs=rngs) if cfg.arch == "dig" else DiT(cfg, rngs=rngs)


__all__ = [
    "DiG", "DiT", "DiffusionBackbone", "LOGICAL_AXIS_NAMES", "SinCosPosEmbed", "count_params", "create_model",
    "logical_axis_names", "model_config_for", "resolve_model_config",
]
