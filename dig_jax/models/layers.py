"""Blocks shared by DiG and DiT: a Dense layer with logical axes, norms, adaLN-Zero, MLPs, the final layer.

Why our own `Dense` instead of `nnx.Linear`: every kernel needs explicit logical axis names and an initializer
with the fans of the *PyTorch* weight it mirrors (fused kernels such as SwiGLU's gate_proj or DiT's qkv are
stored with an extra split axis, [D, 2, I] / [D, 3, D], so that tensor parallelism over "mlp"/"heads" keeps
the two (three) parts aligned, but they are initialised as the fused 2-D torch matrix). Parameters are
float32; the matmul runs in the compute dtype; norms compute their statistics in float32.

Layouts (for the checkpoint converter): Dense kernels are [in, *out] (= torch weight transposed, with the
output axis reshaped where noted), biases [*out].

Deliberate deviations from the official code: SwiGLU's fused gate_proj kernel is stored as [D, 2, I] (torch
weight [2I, D] -> transpose -> reshape; first I rows = gate, last I = value) and its inner size uses the
config's `mlp_ratio` (the official GLAConfig ignores `mlp_ratio` and uses hidden_ratio 4: identical at the
default 4.0).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.models import partitioning as pt
from dig_jax.models.partitioning import Axes, Initializer


class Dense(nnx.Module):
  """y = x @ kernel + bias over the last axis of x; kernel [in, *out_shape] float32, computed in `dtype`."""

  def __init__(self, in_features: int, out_shape: int | Sequence[int], *, axes: Axes, rngs: nnx.Rngs,
               kernel_init: Initializer | None = None, use_bias: bool = True,
               bias_init: Initializer = pt.zeros, dtype=jnp.float32):
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    self.in_features = in_features
    self.out_shape = out_shape
    self.dtype = dtype
    if kernel_init is None:
      kernel_init = pt.xavier_uniform(in_features, math.prod(out_shape))
    self.kernel = pt.make_param(rngs, kernel_init, (in_features, *out_shape), axes)
    self.bias = pt.make_param(rngs, bias_init, out_shape, axes[1:]) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.in_features:
      raise ValueError(f"Dense expects {self.in_features} input features; got shape {x.shape}")
    kernel = self.kernel.get_value().astype(self.dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.reshape(self.in_features, -1))
    y = y.reshape(*x.shape[:-1], *self.out_shape)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm without affine parameters (torch `elementwise_affine=False`), statistics in float32."""

  def __init__(self, eps: float = 1e-6):
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
  xf = x.astype(jnp.float32)
  return xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """fla's RMSNorm: learnable `weight` (init 1, logical axis "embed"), eps 1e-6, statistics in float32."""

  def __init__(self, features: int, *, rngs: nnx.Rngs, eps: float = 1e-6):
    self.eps = eps
    self.weight = pt.make_param(rngs, pt.ones, (features,), (pt.EMBED,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return (rms_normalize(x, self.eps) * self.weight.get_value()).astype(x.dtype)


def make_norm(kind: str, features: int, *, rngs: nnx.Rngs) -> nnx.Module:
  if kind == "layernorm":
    return LayerNorm(eps=1e-6)
  if kind == "rmsnorm":
    return RMSNorm(features, rngs=rngs, eps=1e-6)
  raise ValueError(f"unknown norm {kind!r}; use 'layernorm' or 'rmsnorm'")


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation x * (1 + scale) + shift, with [N, D] shift/scale broadcast over tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def adaln_modulation(hidden_size: int, num_chunks: int, *, rngs: nnx.Rngs, dtype) -> Dense:
  """The zero-initialised SiLU(c) -> Linear(D, num_chunks * D) of adaLN-Zero (SiLU applied by the caller)."""
  return Dense(hidden_size, num_chunks * hidden_size, axes=(pt.EMBED, pt.MODULATION), rngs=rngs,
               kernel_init=pt.zeros, dtype=dtype)


class SwiGLU(nnx.Module):
  """fla's GLAMLP: gate_proj D->2I (no bias, [gate | value]), down_proj(silu(gate) * value), I->D no bias."""

  def __init__(self, hidden_size: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype):
    inner = swiglu_inner_size(hidden_size, mlp_ratio)
    self.inner_size = inner
    self.gate_proj = Dense(hidden_size, (2, inner), axes=(pt.EMBED, None, pt.MLP), rngs=rngs, use_bias=False,
                           kernel_init=pt.xavier_uniform(hidden_size, 2 * inner), dtype=dtype)
    self.down_proj = Dense(inner, hidden_size, axes=(pt.MLP, pt.EMBED), rngs=rngs, use_bias=False,
                           dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.gate_proj(x)
    return self.down_proj(jax.nn.silu(h[..., 0, :]) * h[..., 1, :])


def swiglu_inner_size(hidden_size: int, mlp_ratio: float) -> int:
  """I = 256 * ceil(int(D * ratio * 2 / 3) / 256): 1024/2048/2816/3072 for D = 384/768/1024/1152, ratio 4."""
  inner = int(hidden_size * mlp_ratio * 2 / 3)
  return 256 * ((inner + 255) // 256)


class GeluMLP(nnx.Module):
  """timm's Mlp as DiT uses it: fc1 D->hidden, GELU (tanh approximation), fc2 hidden->D, both with bias."""

  def __init__(self, hidden_size: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype):
    inner = int(hidden_size * mlp_ratio)
    self.fc1 = Dense(hidden_size, inner, axes=(pt.EMBED, pt.MLP), rngs=rngs, dtype=dtype)
    self.fc2 = Dense(inner, hidden_size, axes=(pt.MLP, pt.EMBED), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class FinalLayer(nnx.Module):
  """DiT's final layer: (shift, scale) = adaLN(c); LayerNorm (no affine) -> modulate -> Linear(D, p*p*C_out).

  Both linears are zero-initialised. Output features per token are ordered (p_row, p_col, channel).
  """

  def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs, dtype):
    self.norm_final = LayerNorm(eps=1e-6)
    self.adaln_modulation = adaln_modulation(hidden_size, 2, rngs=rngs, dtype=dtype)
    self.linear = Dense(hidden_size, patch_size * patch_size * out_channels, axes=(pt.EMBED, None), rngs=rngs,
                        kernel_init=pt.zeros, dtype=dtype)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaln_modulation(jax.nn.silu(c)), 2, axis=-1)
    return self.linear(modulate(self.norm_final(x), shift, scale))
