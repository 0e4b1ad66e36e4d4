"""What DiG and DiT share: the stem (patchify, sin-cos table, t/y embedders), the final layer and CFG.

Subclasses build `self.blocks` and implement `_run_blocks(tokens, c) -> tokens`, which must return tokens in
raster order. Layout is JAX's NHWC: x [N, H, W, C] -> out [N, H, W, 2C] (learn_sigma: eps first, then the
variance value) or [N, H, W, C]. The official code is NCHW; the converter transposes.

Top-level parameter paths: x_embedder/proj/{kernel [p*p*C, D], bias [D]}, pos_embed [1, T, D] (SinCosPosEmbed,
not an nnx.Param), t_embedder/fc1/{kernel [256, D], bias}, t_embedder/fc2/{kernel [D, D], bias},
y_embedder/embedding_table [num_classes + 1, D], final_layer/adaln_modulation/{kernel [D, 2D], bias [2D]},
final_layer/linear/{kernel [D, p*p*C_out], bias} (output features ordered (p_row, p_col, channel)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dig_jax.models import partitioning as pt
from dig_jax.models.configs import input_hw
from dig_jax.models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d_table, unpatchify
from dig_jax.models.layers import FinalLayer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class DiffusionBackbone(nnx.Module):
  """Base class: stem + final layer + `forward_with_cfg`; the blocks come from the subclass."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.config = ml_collections.FrozenConfigDict(config)
    cfg = self.config
    self.dtype = DTYPES[cfg.dtype]
    self.image_hw = input_hw(cfg.input_size)
    self.patch_size = cfg.patch_size
    self.grid = (self.image_hw[0] // cfg.patch_size, self.image_hw[1] // cfg.patch_size)
    self.in_channels = cfg.in_channels
    self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
    d = cfg.hidden_size
    self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d, rngs=rngs, dtype=self.dtype)
    table = sincos_2d_table(d, *self.grid)[None].astype("float32")
    self.pos_embed = pt.make_variable(jnp.asarray(table), (None, None, pt.EMBED), pt.SinCosPosEmbed)
    self.t_embedder = TimestepEmbedder(d, rngs=rngs, dtype=self.dtype)
    self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob, rngs=rngs, dtype=self.dtype)
    self.final_layer = FinalLayer(d, cfg.patch_size, self.out_channels, rngs=rngs, dtype=self.dtype)

  def _run_blocks(self, tokens: jax.Array, c: jax.Array) -> jax.Array:
    raise NotImplementedError

  def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
    expected = (*self.image_hw, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(f"x must be NHWC [N, {expected[0]}, {expected[1]}, {expected[2]}] (the model's "
                       f"input_size / in_channels); got {tuple(x.shape)}")
    if jnp.shape(t) != (x.shape[0],) or jnp.shape(y) != (x.shape[0],):
      raise ValueError(f"t and y must have shape [N] = [{x.shape[0]}]; got {jnp.shape(t)} and {jnp.shape(y)}")

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *,
               label_drop_rng: jax.Array | None = None) -> jax.Array:
    """x [N, H, W, C], t [N] (int or float), y [N] int labels -> [N, H, W, out_channels] float32.

    Labels are dropped to the null class with probability class_dropout_prob iff `label_drop_rng` is given.
    """
    self._check_inputs(x, t, y)
    tokens = self.x_embedder(x) + self.pos_embed.get_value().astype(self.dtype)
    c = self.t_embedder(t) + self.y_embedder(y, label_drop_rng)
    tokens = self._run_blocks(tokens, c)
    out = self.final_layer(tokens, c)
    return unpatchify(out, self.grid, self.patch_size, self.out_channels).astype(jnp.float32)

  def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale: float | jax.Array
                       ) -> jax.Array:
    """DiT's batched classifier-free guidance.

    x [2N, ...]: only the first half is used (copied to both halves, as the official code does); y's second
    half is expected to be the null class. Guidance eps_u + s * (eps_c - eps_u) is applied to the first
    `cfg_channels` output channels and written to both halves; the other channels are the model output.
    """
    if x.shape[0] % 2:
      raise ValueError(f"forward_with_cfg needs an even batch [cond | uncond]; got {x.shape[0]}")
    half = x[: x.shape[0] // 2]
    out = self(jnp.concatenate([half, half], axis=0), t, y)
    k = self.config.cfg_channels
    eps, rest = out[..., :k], out[..., k:]
    cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
    guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)


def maybe_remat(fn, remat: str):
  """`nnx.remat(fn)` when remat == "block" (recompute each block's activations in the backward pass)."""
  if remat == "block":
    return nnx.remat(fn)
  if remat != "none":
    raise ValueError(f"unknown remat {remat!r}; use 'none' or 'block'")
  return fn
