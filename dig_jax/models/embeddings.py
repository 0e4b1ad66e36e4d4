"""The DiT stem used by DiG and DiT: patch embedding, fixed 2-D sin-cos table, timestep and label embedders.

Exactly DiT's (and so DiG's) definitions, in JAX layout:
- Patch embedding: torch's Conv2d(C, D, kernel=stride=p, bias) is a matmul on non-overlapping patches, so it
  is stored as a Dense kernel [p*p*C, D] (logical ("patch", "embed")) whose input features are ordered
  (p_row, p_col, channel) -- torch weight [D, C, p, p] -> permute(2, 3, 1, 0) -> reshape(p*p*C, D). Init is
  xavier_uniform on the flattened (D, C*p*p) view, bias 0, as the official code does.
- Sin-cos table: MAE's 2-D table, first D/2 channels encode the column (w) coordinate and the last D/2 the row
  (h) coordinate, each half [sin(pos*w_i), cos(pos*w_i)] with w_i = 10000^(-i/(D/4)); tokens in raster (h, w)
  order. Stored as a non-trainable `SinCosPosEmbed` Variable of shape [1, T, D] (the official `pos_embed`).
  Non-square grids (H != W) use the same formula with meshgrid(w, h) (the official code builds square ones).
- Timestep embedding: 256-dim sinusoid [cos | sin], max_period 10000, in float32 -> Linear -> SiLU -> Linear,
  weights normal(0.02), biases 0. Parameter paths `t_embedder/fc1`, `t_embedder/fc2` (torch `mlp.0`, `mlp.2`).
- Label embedding: table [num_classes + 1, D] (row num_classes = the null class for CFG), normal(0.02). As in
  the official LabelEmbedder the null row exists only when class_dropout_prob > 0. Labels are dropped to the
  null class with probability class_dropout_prob iff a `drop_rng` is given (the official code drops when
  `self.training`), which keeps the train step a pure function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dig_jax.models import partitioning as pt
from dig_jax.models.layers import Dense

FREQUENCY_EMBEDDING_SIZE = 256


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """[M, embed_dim] = [sin(pos * omega) | cos(pos * omega)], omega_i = 10000^(-i / (embed_dim/2)), float64."""
  if embed_dim % 2:
    raise ValueError(f"sin-cos embedding needs an even dimension; got {embed_dim}")
  omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
  angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_table(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """MAE 2-D table [grid_h * grid_w, embed_dim] in raster order, column (w) coordinate in the first half."""
  if embed_dim % 4:
    raise ValueError(f"the 2-D sin-cos table needs hidden_size divisible by 4; got {embed_dim}")
  cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
  return np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)


def timestep_sinusoid(t: jax.Array, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0
                      ) -> jax.Array:
  """GLIDE/DiT timestep embedding [N, dim] = [cos(t * f) | sin(t * f)], f_i = max_period^(-i / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
  """[N, H, W, C] -> [N, (H/p)*(W/p), p*p*C], tokens in raster order, features (p_row, p_col, channel)."""
  n, h, w, c = x.shape
  p = patch_size
  x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, grid: tuple[int, int], patch_size: int, channels: int) -> jax.Array:
  """[N, h*w, p*p*C] (features (p_row, p_col, channel), raster tokens) -> [N, h*p, w*p, C].

  The NHWC image of the official `unpatchify` ((n, h, w, p, q, c) -> (n, c, h*p, w*q)).
  """
  n = x.shape[0]
  rows, cols = grid
  p = patch_size
  x = x.reshape(n, rows, cols, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, rows * p, cols * p, channels)


class PatchEmbed(nnx.Module):
  """Conv2d(kernel=stride=p) patch embedding as a Dense on patches; parameters under `proj`."""

  def __init__(self, patch_size: int, in_channels: int, hidden_size: int, *, rngs: nnx.Rngs, dtype):
    self.patch_size = patch_size
    fan_in = patch_size * patch_size * in_channels
    self.proj = Dense(fan_in, hidden_size, axes=(pt.PATCH, pt.EMBED), rngs=rngs,
                      kernel_init=pt.xavier_uniform(fan_in, hidden_size), dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(patchify(x, self.patch_size))


class TimestepEmbedder(nnx.Module):
  """t -> 256-dim sinusoid -> fc1 (256->D) -> SiLU -> fc2 (D->D)."""

  def __init__(self, hidden_size: int, *, rngs: nnx.Rngs, dtype):
    self.fc1 = Dense(FREQUENCY_EMBEDDING_SIZE, hidden_size, axes=(None, pt.EMBED), rngs=rngs,
                     kernel_init=pt.normal(0.02), dtype=dtype)
    self.fc2 = Dense(hidden_size, hidden_size, axes=(None, pt.EMBED), rngs=rngs,
                     kernel_init=pt.normal(0.02), dtype=dtype)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.silu(self.fc1(timestep_sinusoid(t))))


class LabelEmbedder(nnx.Module):
  """Class-label table with label dropout to the null class (index num_classes), for classifier-free guidance.

  Parameter `embedding_table` [num_classes + 1, D] (torch y_embedder.embedding_table.weight). A label outside
  the table (e.g. the null class of a model built with class_dropout_prob=0) gives a NaN embedding (jnp.take's
  "fill" mode), so the mistake shows instead of being clamped silently.
  """

  def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *, rngs: nnx.Rngs, dtype):
    self.num_classes = num_classes
    self.dropout_prob = float(dropout_prob)
    self.dtype = dtype
    rows = num_classes + int(dropout_prob > 0)
    self.embedding_table = pt.make_param(rngs, pt.normal(0.02), (rows, hidden_size), (pt.CLASSES, pt.EMBED))

  def __call__(self, labels: jax.Array, drop_rng: jax.Array | None = None) -> jax.Array:
    labels = jnp.asarray(labels).astype(jnp.int32)
    if drop_rng is not None and self.dropout_prob > 0:
      drop = jax.random.uniform(drop_rng, labels.shape) < self.dropout_prob
      labels = jnp.where(drop, self.num_classes, labels)
    return jnp.take(self.embedding_table.get_value(), labels, axis=0).astype(self.dtype)
