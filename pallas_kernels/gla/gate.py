"""The low-rank forget gate of fla's GLA layer as one value the GLA op can take instead of a log gate.

fla's `GatedLinearAttention` (and so DiG, dig_spec.md §2.3) forms its per-key-channel log forget gate as

    log_gate = logsigmoid(x W_down W_up + b_up) / normalizer        ([B, T, D] -> [B, T, H, K], <= 0)

with a rank-16 bottleneck and normalizer 16. In XLA this is ~11 small kernels per layer and step (two skinny
GEMMs, the log-sigmoid, and in the backward its derivative, four weight/input GEMMs and a bias reduction),
plus the GLA op's own chunk-local cumsum and its transpose: at DiG-S/2's 256 px training step they are
launch-bound (benchmarks/NOTES.md, session 9). Passing a `LowRankGate` to `ops.gla` lets a kernel module
form the gate, its chunk-local cumsum and their gradients in one kernel each way (`gpu_gate.py`); every
other implementation evaluates `low_rank_log_gate` (the reference, the same arithmetic as the model's
`Dense` layers) and runs as with a log gate.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

Array = jax.Array
MATMUL_DTYPES = ("float32", "bfloat16", "float16")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x", "w_down", "w_up", "b_up"],
                   meta_fields=["normalizer", "matmul_dtype"])
@dataclasses.dataclass(frozen=True)
class LowRankGate:
  """x [B, T, D]; w_down [D, R]; w_up [R, H*K] (heads leading, fla's (h d) layout); b_up [H*K].

  `matmul_dtype` is the dtype both projections run in (operands cast to it, fp32 accumulation; "float32" is
  DiG's default, the compute dtype is what PyTorch autocast gives); log-sigmoid and the division stay fp32.
  """
  x: Array
  w_down: Array
  w_up: Array
  b_up: Array
  normalizer: float = 16.0
  matmul_dtype: str = "float32"

  def check(self, q_shape: tuple[int, ...]) -> None:
    """One clear error for shapes that do not fit q [B, T, H, K] (or each other)."""
    b, t, h, dk = q_shape
    if self.matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(f"LowRankGate.matmul_dtype must be one of {MATMUL_DTYPES}; got {self.matmul_dtype!r}")
    shapes = (self.x.shape, self.w_down.shape, self.w_up.shape, self.b_up.shape)
    ok = (self.x.ndim == 3 and self.x.shape[:2] == (b, t) and self.w_down.ndim == 2
          and self.w_down.shape[0] == self.x.shape[-1] and self.w_up.ndim == 2
          and self.w_up.shape == (self.w_down.shape[1], h * dk) and self.b_up.shape == (h * dk,))
    if not ok:
      raise ValueError(f"LowRankGate shapes x{shapes[0]} w_down{shapes[1]} w_up{shapes[2]} b_up{shapes[3]} "
                       f"do not fit q{tuple(q_shape)}: expected x [{b}, {t}, D], w_down [D, R], "
                       f"w_up [R, {h * dk}], b_up [{h * dk}]")


def low_rank_log_gate(gate: LowRankGate, heads: int) -> Array:
  """The reference: logsigmoid(x W_down W_up + b_up) / normalizer as float32 [B, T, heads, K]."""
  dtype = jnp.dtype(gate.matmul_dtype)
  z = jnp.dot(gate.x.astype(dtype), gate.w_down.astype(dtype))
  logits = (jnp.dot(z, gate.w_up.astype(dtype)) + gate.b_up.astype(dtype)).astype(jnp.float32)
  log_gate = jax.nn.log_sigmoid(logits) / gate.normalizer
  return log_gate.reshape(*log_gate.shape[:-1], heads, -1)
