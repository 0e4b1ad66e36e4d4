"""DiG: Diffusion Gated Linear Attention Transformer (hustvl/DiG `DiG-*-bid-layer-dwconv-qdir`), Flax NNX.

DiT's scaffolding (`backbone.py`) around `depth` DiG blocks (dig_spec.md §2.2):

  (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = Linear_6D(SiLU(c))   (zero-init)
  x = x + gate_msa * GLA(modulate(norm1(x), shift_msa, scale_msa))
  x = x + gate_mlp * SwiGLU(modulate(norm2(x), shift_mlp, scale_mlp))
  x = DWConv3x3(x on the current token grid)                                            (identity-init)

followed, in the model loop, by SREM's scan-order change (flip after every block, transpose after odd blocks;
`srem.py`). norm = LayerNorm without affine, eps 1e-6 (or fla's RMSNorm with `norm="rmsnorm"`, the
`if_rms_norm` option; the final layer's norm stays a LayerNorm either way, as in the code).

Block parameter paths (i = block index; Dense kernels [in, out] = torch weight transposed), written per
block (blocks/i/..., the layout with model.stack_blocks=False); with stacked blocks (the default) the same
leaves sit at blocks/... with a leading [depth] axis (backbone.py):
  blocks/i/adaln_modulation/{kernel [D, 6D], bias [6D]}  torch blocks.i.adaLN_modulation.1
  blocks/i/attn/...                                      torch blocks.i.attn.* (see gla_attention.py)
  blocks/i/mlp/gate_proj/kernel [D, 2, I]                torch gate_proj.weight [2I, D] .T.reshape(D, 2, I)
  blocks/i/mlp/down_proj/kernel [I, D]                   torch down_proj.weight [D, I] .T
  blocks/i/dw_conv/{kernel [3, 3, 1, D], bias [D]}      torch dw_conv.weight [D, 1, 3, 3] .permute(2, 3, 1, 0)
  blocks/i/norm1/weight, blocks/i/norm2/weight [D]       only with norm="rmsnorm"

Deliberate deviations from the official code (details in each module's docstring):
- NHWC layout (the converter transposes); non-square latents supported (grid tracked through the transposes);
- scan order restored to raster before the final layer for any depth (official: depth % 4 == 0 assumed);
- under bfloat16 compute the forget-gate path and the GLA output norm run in float32;
- label dropout happens iff an rng is passed (official: in training mode);
- fused kernels (SwiGLU gate_proj, DiT qkv) stored with a split axis;
- not implemented: the long-skip (`-skip`, `-skipzero`) variants, `if_in_block_conv`, unconditional models
  (num_classes = 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dig_jax.models import srem
from dig_jax.models.backbone import DiffusionBackbone, create_blocks, maybe_remat, run_stacked_blocks
from dig_jax.models.gla_attention import GatedLinearAttention
from dig_jax.models.layers import SwiGLU, adaln_modulation, make_norm, modulate


class DiGBlock(nnx.Module):
  """One DiG block; tokens [N, T, D] in the block's scan order on a (rows, cols) grid."""

  def __init__(self, cfg: ml_collections.FrozenConfigDict, *, rngs: nnx.Rngs, dtype):
    d = cfg.hidden_size
    self.adaln_modulation = adaln_modulation(d, 6, rngs=rngs, dtype=dtype)
    self.norm1 = make_norm(cfg.norm, d, rngs=rngs)
    self.attn = GatedLinearAttention(d, cfg.num_heads, rngs=rngs, dtype=dtype, impl=cfg.gla_impl,
                                     chunk_size=cfg.gla_chunk_size, fused_proj=cfg.gla_fused_proj,
                                     gate_dtype=cfg.gla_gate_dtype, fused_gate=cfg.gla_fused_gate)
    self.norm2 = make_norm(cfg.norm, d, rngs=rngs)
    self.mlp = SwiGLU(d, cfg.mlp_ratio, rngs=rngs, dtype=dtype)
    self.dw_conv = (None if cfg.dwconv == "off"
                    else srem.DepthwiseConv(d, init=cfg.dwconv, rngs=rngs, dtype=dtype,
                                            impl=cfg.dwconv_impl))

  def __call__(self, x: jax.Array, c: jax.Array, grid: srem.Grid, reorient: str = "none") -> jax.Array:
    """The block, then the scan-order change `reorient` that follows it (`srem.reorientation_after_block`);
    with `dwconv_impl="pallas"` the conv applies it as it writes its output."""
    # Named scopes only label the ops for profiles (benchmarks/trace_summary.py); they change nothing else.
    with jax.named_scope("adaln"):
      (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = jnp.split(
          self.adaln_modulation(jax.nn.silu(c)), 6, axis=-1)
    with jax.named_scope("norm_modulate"):
      h = modulate(self.norm1(x), shift_msa, scale_msa)
    x = x + gate_msa[:, None] * self.attn(h)
    with jax.named_scope("norm_modulate"):
      h = modulate(self.norm2(x), shift_mlp, scale_mlp)
    with jax.named_scope("mlp"):
      x = x + gate_mlp[:, None] * self.mlp(h)
    if self.dw_conv is not None:
      with jax.named_scope("dwconv"):
        return self.dw_conv(x, grid, reorient)
    with jax.named_scope("reorient"):
      return srem.reorient_tokens(x, grid, reorient)[0]


class DiG(DiffusionBackbone):
  """DiG model: `model(x, t, y, *, label_drop_rng=None)` and `model.forward_with_cfg(x, t, y, cfg_scale)`."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    if self.config.arch != "dig":
      raise ValueError(f"DiG built from a config with arch={self.config.arch!r}")
    self.blocks = create_blocks(lambda block_rngs: DiGBlock(self.config, rngs=block_rngs, dtype=self.dtype),
                                self.config.depth, self.config.stack_blocks, rngs)

  def _run_blocks(self, tokens: jax.Array, c: jax.Array) -> jax.Array:
    cfg = self.config
    schedule = cfg.scan_schedule
    _, final_order, grids = srem.block_scan_orders(cfg.depth, self.grid, schedule)
    if cfg.stack_blocks:
      # Block i sees grids[i] and is followed by the reorientation of block i mod period: one step per
      # position in the schedule's repeating unit.
      period = min(srem.schedule_period(schedule, self.grid), cfg.depth)
      assert all(grids[i] == grids[i % period] for i in range(cfg.depth)), (grids, period)
      steps = [_block_step(grids[k], k, schedule) for k in range(period)]
      tokens = run_stacked_blocks(self.blocks, tokens, c, steps, remat=cfg.remat, unroll=cfg.scan_unroll)
      return srem.restore_raster(tokens, final_order)
    for i, block in enumerate(self.blocks):
      tokens = maybe_remat(_block_step(grids[i], i, schedule), cfg.remat)(block, tokens, c)
    return srem.restore_raster(tokens, final_order)


def _block_step(grid: srem.Grid, position: int, schedule: str):
  """The block on `grid`, then the reorientation that follows block `position`.

  The (static) grid is closed over, so `nnx.remat` / `jax.checkpoint` never trace it.
  """
  reorient = srem.reorientation_after_block(position, schedule)

  def step(block: DiGBlock, x: jax.Array, c: jax.Array) -> jax.Array:
    return block(x, c, grid, reorient)
  return step
