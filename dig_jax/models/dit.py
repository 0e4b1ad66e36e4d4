"""DiT (facebookresearch/DiT `models.py`, as shipped in hustvl/DiG `models_dit.py`), Flax NNX.

DiT block: adaLN-Zero (6 vectors, zero-init) around multi-head self-attention (timm Attention, qkv and proj
with bias, no q/k norm) and a GELU(tanh) MLP of ratio 4; LayerNorms without affine, eps 1e-6. Init:
xavier_uniform on every Linear (bias 0) except the zero-initialised adaLN / final layers and the normal(0.02)
t-embedder. Attention runs through `jax.nn.dot_product_attention` (`attention_impl`: "xla", "cudnn" (needs
bf16/fp16 on an NVIDIA GPU) or "auto" = let JAX choose).

Block parameter paths (Dense kernels [in, out] = torch weight transposed). Written per block (blocks/i/...,
the layout with model.stack_blocks=False); with stacked blocks (the default) the same leaves sit at blocks/...
with a leading [depth] axis (backbone.py):
  blocks/i/adaln_modulation/{kernel [D, 6D], bias [6D]}   torch blocks.i.adaLN_modulation.1
  blocks/i/attn/qkv/{kernel [D, 3, D], bias [3, D]}       torch attn.qkv.weight [3D, D] .T.reshape(D, 3, D)
  blocks/i/attn/proj/{kernel [D, D], bias [D]}
  blocks/i/mlp/fc1/{kernel [D, 4D], bias}, blocks/i/mlp/fc2/{kernel [4D, D], bias}

Deviations: NHWC layout, non-square latents allowed, fused qkv stored with a split axis [D, 3, D] (heads stay
the leading factor of each D, as timm's reshape (3, H, head_dim)), label dropout driven by an explicit rng.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dig_jax.models import partitioning as pt
from dig_jax.models.backbone import DiffusionBackbone, create_blocks, maybe_remat, run_stacked_blocks
from dig_jax.models.layers import Dense, GeluMLP, adaln_modulation, make_norm, modulate

_ATTENTION_IMPLS = {"xla": "xla", "cudnn": "cudnn", "auto": None}


class Attention(nnx.Module):
  """timm Attention(qkv_bias=True) through jax.nn.dot_product_attention; [N, T, D] -> [N, T, D]."""

  def __init__(self, hidden_size: int, num_heads: int, *, rngs: nnx.Rngs, dtype, impl: str = "auto"):
    if impl not in _ATTENTION_IMPLS:
      raise ValueError(f"unknown attention_impl {impl!r}; choose one of {tuple(_ATTENTION_IMPLS)}")
    self.num_heads = num_heads
    self.head_dim = hidden_size // num_heads
    self.implementation = _ATTENTION_IMPLS[impl]
    self.qkv = Dense(hidden_size, (3, hidden_size), axes=(pt.EMBED, None, pt.HEADS), rngs=rngs, dtype=dtype,
                     kernel_init=pt.xavier_uniform(hidden_size, 3 * hidden_size))
    self.proj = Dense(hidden_size, hidden_size, axes=(pt.HEADS, pt.EMBED), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, d = x.shape
    qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)
    o = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                     implementation=self.implementation)
    return self.proj(o.reshape(n, t, d))


class DiTBlock(nnx.Module):

  def __init__(self, cfg: ml_collections.FrozenConfigDict, *, rngs: nnx.Rngs, dtype):
    d = cfg.hidden_size
    self.adaln_modulation = adaln_modulation(d, 6, rngs=rngs, dtype=dtype)
    self.norm1 = make_norm(cfg.norm, d, rngs=rngs)
    self.attn = Attention(d, cfg.num_heads, rngs=rngs, dtype=dtype, impl=cfg.attention_impl)
    self.norm2 = make_norm(cfg.norm, d, rngs=rngs)
    self.mlp = GeluMLP(d, cfg.mlp_ratio, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    # Named scopes only label the ops for profiles (benchmarks/trace_summary.py); they change nothing else.
    with jax.named_scope("adaln"):
      (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = jnp.split(
          self.adaln_modulation(jax.nn.silu(c)), 6, axis=-1)
    with jax.named_scope("norm_modulate"):
      h = modulate(self.norm1(x), shift_msa, scale_msa)
    with jax.named_scope("attention"):
      x = x + gate_msa[:, None] * self.attn(h)
    with jax.named_scope("norm_modulate"):
      h = modulate(self.norm2(x), shift_mlp, scale_mlp)
    with jax.named_scope("mlp"):
      return x + gate_mlp[:, None] * self.mlp(h)


class DiT(DiffusionBackbone):
  """DiT model: `model(x, t, y, *, label_drop_rng=None)` and `model.forward_with_cfg(x, t, y, cfg_scale)`."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    if self.config.arch != "dit":
      raise ValueError(f"DiT built from a config with arch={self.config.arch!r}")
    self.blocks = create_blocks(lambda block_rngs: DiTBlock(self.config, rngs=block_rngs, dtype=self.dtype),
                                self.config.depth, self.config.stack_blocks, rngs)

  def _run_blocks(self, tokens: jax.Array, c: jax.Array) -> jax.Array:
    step = lambda blk, x, cond: blk(x, cond)  # noqa: E731
    if self.config.stack_blocks:
      return run_stacked_blocks(self.blocks, tokens, c, [step], remat=self.config.remat,
                                unroll=self.config.scan_unroll)
    call = maybe_remat(step, self.config.remat)
    for block in self.blocks:
      tokens = call(block, tokens, c)
    return tokens
