"""DiG's gated linear attention layer (fla `GatedLinearAttention` as DiG configures it, dig_spec.md §2.3).

For hidden size D and H heads: q = x Wq, k = x Wk (D -> D/2, head dim 32), v = x Wv (D -> D, head dim 64), no
biases, no feature map, no q/k norm, no short conv; per-head, per-key-channel log forget gate
gk = logsigmoid(Wup(Wdown x) + b_up) / 16 with a rank-16 bottleneck (Wdown D->16 no bias, Wup 16->D/2 with
bias); o = GLA(q, k, v, gk) (causal, scale 32^-0.5 inside the op, float32 state; `pallas_kernels.gla.gla`);
then per head o <- RMSNorm_64(o) * weight * swish(g) with g = x Wg (D -> D, no bias) and one weight of shape
(64,) shared by the heads (eps 1e-6); out = o Wo (D -> D, no bias). Heads are the leading factor of every
projection's output features ((h d) layout, as fla's rearrange). Every linear here is xavier_uniform with gain
2^-2.5 and the gate bias is zero (fla's own init, which DiG's global init skips).

Parameter paths / layouts (kernels [in, out] = torch weight transposed): q_proj, k_proj [D, D/2]; v_proj,
g_proj, o_proj [D, D]; gk_proj_down [D, 16] (torch gk_proj.0); gk_proj_up [16, D/2] + bias [D/2] (torch
gk_proj.1); g_norm_swish_gate/weight [64].

Deviations: in bfloat16 compute mode the forget-gate path (two small projections + logsigmoid) and the output
RMSNorm run in float32 (fla's kernels also normalise in float32); q/k/v go to the GLA op in the compute dtype.
`gate_dtype="compute"` runs the forget-gate projections in the compute dtype instead (what PyTorch autocast
does with fla's layer; logsigmoid and /16 stay float32).

`fused_proj=True` computes q, k, v and g with ONE matmul: the four kernels, stored separately (checkpoint
layout unchanged), are concatenated per head at call time into [D, H, 2*Dk/H + 2*Dv/H], so x is read once and
the backward is one input-gradient and one weight-gradient GEMM instead of four each; a tensor-parallel split
over heads stays local. Each output column is the same dot product. Off by default: on an H100 (DiG-S/2,
256 px, B=32, bf16, cells compiled one at a time) it measured 2455 img/s against 2567 separate, and the
projections' GPU time was the same (~1.0 ms/step); `gate_dtype="compute"` measured 2483 (benchmarks/NOTES.md).

`fused_gate=True` (the default) hands the forget gate to the GLA op unformed
(`pallas_kernels.gla.gate.LowRankGate`: x and the gate's three parameters): on the GPU kernel path z = x Wdown
stays one XLA GEMM and the up-projection, log-sigmoid / 16 and chunk-local cumsum are one Pallas kernel,
their gradients two (`pallas_kernels/gla/gpu_gate.py`), instead of ~11 XLA kernels plus the op's cumsum
passes; every other GLA implementation evaluates the same formula in XLA (`gate.low_rank_log_gate`, the same
arithmetic as the layers here), so the parameters, their paths and the results off the GPU kernel path do not
change. On an H100 (DiG-S/2, bf16; benchmarks/NOTES.md, session 10) it trained 3-4 % faster with 7 % less
memory at 1792 px; at 256 px the training gain (~1-2 %) is inside the run spread, the sampling forward 7-11 %
faster, memory -6 %. In profiles the gate's kernels sit in the `gla_op` scope.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.gla import gla
from pallas_kernels.gla.gate import LowRankGate

from dig_jax.models import partitioning as pt
from dig_jax.models.layers import Dense, rms_normalize

GLA_INIT_GAIN = 2 ** -2.5
GATE_LOW_RANK_DIM = 16
GATE_LOGIT_NORMALIZER = 16


class RMSNormSwishGate(nnx.Module):
  """fla's FusedRMSNormSwishGate: RMSNorm over the last (head) dim with a shared weight, times swish(g)."""

  def __init__(self, head_dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6):
    self.eps = eps
    self.weight = pt.make_param(rngs, pt.ones, (head_dim,), (None,))

  def __call__(self, o: jax.Array, g: jax.Array) -> jax.Array:
    gf = g.astype(jnp.float32)
    out = rms_normalize(o, self.eps) * self.weight.get_value() * (gf * jax.nn.sigmoid(gf))
    return out.astype(o.dtype)


class GatedLinearAttention(nnx.Module):
  """The GLA token mixer of a DiG block. Input and output [N, T, D], tokens in the block's scan order."""

  def __init__(self, hidden_size: int, num_heads: int, *, rngs: nnx.Rngs, dtype, impl: str = "auto",
               chunk_size: int | None = 64, expand_k: float = 0.5, expand_v: float = 1.0,
               norm_eps: float = 1e-6, fused_proj: bool = False, gate_dtype: str = "float32",
               fused_gate: bool = True):
    key_dim = int(hidden_size * expand_k)
    value_dim = int(hidden_size * expand_v)
    if key_dim % num_heads or value_dim % num_heads:
      raise ValueError(f"GLA key dim {key_dim} and value dim {value_dim} must be divisible by "
                       f"{num_heads} heads")
    self.num_heads = num_heads
    self.head_k_dim = key_dim // num_heads
    self.head_v_dim = value_dim // num_heads
    self.impl = impl
    self.chunk_size = chunk_size
    self.dtype = dtype
    self.fused_proj = fused_proj
    self.fused_gate = fused_gate
    if gate_dtype not in ("float32", "compute"):
      raise ValueError(f"GLA gate_dtype must be 'float32' or 'compute'; got {gate_dtype!r}")
    gate_compute_dtype = jnp.float32 if gate_dtype == "float32" else dtype

    def linear(fan_in, fan_out, axes, use_bias=False, compute_dtype=dtype):
      return Dense(fan_in, fan_out, axes=axes, rngs=rngs, use_bias=use_bias, dtype=compute_dtype,
                   kernel_init=pt.xavier_uniform(fan_in, fan_out, gain=GLA_INIT_GAIN))

    self.q_proj = linear(hidden_size, key_dim, (pt.EMBED, pt.HEADS))
    self.k_proj = linear(hidden_size, key_dim, (pt.EMBED, pt.HEADS))
    self.v_proj = linear(hidden_size, value_dim, (pt.EMBED, pt.HEADS))
    self.g_proj = linear(hidden_size, value_dim, (pt.EMBED, pt.HEADS))
    self.gk_proj_down = linear(hidden_size, GATE_LOW_RANK_DIM, (pt.EMBED, pt.GATE_RANK),
                               compute_dtype=gate_compute_dtype)
    self.gk_proj_up = linear(GATE_LOW_RANK_DIM, key_dim, (pt.GATE_RANK, pt.HEADS), use_bias=True,
                             compute_dtype=gate_compute_dtype)
    self.g_norm_swish_gate = RMSNormSwishGate(self.head_v_dim, rngs=rngs, eps=norm_eps)
    self.o_proj = linear(value_dim, hidden_size, (pt.HEADS, pt.EMBED))

  def log_forget_gate(self, x: jax.Array) -> jax.Array:
    """gk = logsigmoid(low-rank projection) / 16, float32, [N, T, D/2] (<= 0)."""
    logits = self.gk_proj_up(self.gk_proj_down(x)).astype(jnp.float32)
    return jax.nn.log_sigmoid(logits) / GATE_LOGIT_NORMALIZER

  def low_rank_gate(self, x: jax.Array) -> LowRankGate:
    """The unformed forget gate for `gla` (fused_gate=True); its `low_rank_log_gate` is log_forget_gate(x)."""
    up = self.gk_proj_up
    return LowRankGate(x, self.gk_proj_down.kernel.get_value(), up.kernel.get_value(), up.bias.get_value(),
                       normalizer=GATE_LOGIT_NORMALIZER, matmul_dtype=jnp.dtype(up.dtype).name)

  def project_qkvg(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """q, k [N, T, H, Dk/H] and v, g [N, T, H, Dv/H] in the compute dtype."""
    n, t, d = x.shape
    h = self.num_heads
    projections = (self.q_proj, self.k_proj, self.v_proj, self.g_proj)
    widths = (self.head_k_dim, self.head_k_dim, self.head_v_dim, self.head_v_dim)
    if not self.fused_proj:
      return tuple(p(x).reshape(n, t, h, w) for p, w in zip(projections, widths))
    if d != self.q_proj.in_features:
      raise ValueError(f"GLA expects {self.q_proj.in_features} input features; got shape {x.shape}")
    kernel = jnp.concatenate([p.kernel.get_value().astype(self.dtype).reshape(d, h, w)
                              for p, w in zip(projections, widths)], axis=-1)
    y = jnp.dot(x.astype(self.dtype), kernel.reshape(d, -1)).reshape(n, t, h, sum(widths))
    bounds = [sum(widths[:i]) for i in range(1, len(widths))]
    return tuple(jnp.split(y, bounds, axis=-1))

  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, _ = x.shape
    h = self.num_heads

    # Named scopes only label the ops for profiles (benchmarks/trace_summary.py); they change nothing else.
    with jax.named_scope("gla_proj"):
      q, k, v, g = self.project_qkvg(x)
    with jax.named_scope("gla_gate"):
      if self.fused_gate:
        log_gate = self.low_rank_gate(x)
      else:
        log_gate = self.log_forget_gate(x).reshape(n, t, h, self.head_k_dim)
    with jax.named_scope("gla_op"):
      o = gla(q, k, v, log_gate, impl=self.impl, chunk_size=self.chunk_size)
    with jax.named_scope("gla_out"):
      o = self.g_norm_swish_gate(o, g).astype(self.dtype)
      return self.o_proj(o.reshape(n, t, h * self.head_v_dim))
