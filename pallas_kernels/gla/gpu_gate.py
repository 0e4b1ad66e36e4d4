"""The low-rank forget gate's up-projection, log-sigmoid and chunk cumsum as Pallas GPU kernels (Triton).

`cumulative_low_rank_gate(x, w_down, w_up, b_up, spec)` returns what the GLA kernels read,

    G = chunk-local inclusive cumsum over tokens of  logsigmoid(x W_down W_up + b_up) / normalizer

as float32 [B, T, H*K] (T a multiple of the chunk), with a `jax.custom_vjp`. Forward: z = x W_down is one XLA
GEMM (kept as the backward's residual, [B, T, R]); then one program per (batch, chunk, head) forms the logits
u = z W_up + b, the log-sigmoid and the cumsum, and stores that head's G. Backward, two kernels: per (batch,
chunk, head) the reverse cumsum of dG (total - cumsum + dG, as fla does) times the log-sigmoid's derivative
sigmoid(-u) / normalizer gives du, and with it the head's dz = du W_up^T and its shares of dW_up = z^T du and
db = sum du; per (batch, chunk, D tile) dz summed over heads gives dx = dz W_down^T and the chunk's share of
dW_down = x^T dz. XLA sums the shares over (batch, chunk), which keeps the gradients deterministic (no
atomics). The XLA path this replaces is ~11 kernels per layer plus the GLA op's cumsum and its transpose
(gate.py says why that matters).

Grid shape, measured (NOTES.md, session 10, H100): a first version ran one program per (batch, chunk) over
all heads, z included, in each direction; at DiG-S/2's 256 px shape (B32 T256 H6, 128 programs) its forward
kernel alone took 34 us against 23 us for XLA's whole forward gate path: too few programs, each walking six
heads in sequence. Hence XLA's GEMM for z and a head axis in the grid.

Numerics follow the XLA path it replaces (`gate.low_rank_log_gate`, the model's Dense layers): operands in
`matmul_dtype` with fp32 accumulation; z in `matmul_dtype` (XLA's Dense output); fp32 operands use the
caller's matmul precision as `jnp.dot` would (TF32 tensor cores on H100 unless `jax.default_matmul_precision`
is "highest"/"float32", then IEEE). Triton needs power-of-two tensors, so D (384 for DiG-S) is walked in
power-of-two column tiles and H*K one head at a time.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gla.gate import LowRankGate

Array = jax.Array
MAX_BLOCK_D = 128
MIN_DIM = 16  # Triton dots need every dimension >= 16
IEEE_CONTEXTS = ("highest", "float32")


def _pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two <= cap dividing n."""
  block = 1
  while block * 2 <= cap and n % (block * 2) == 0:
    block *= 2
  return block


def _is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def is_supported(gate: LowRankGate, q_shape: tuple[int, ...], chunk: int) -> bool:
  """Rank and head dim powers of two >= 16, D a multiple of 16, chunk a power of two >= 16."""
  rank, dim = gate.w_down.shape[1], gate.x.shape[-1]
  return (_is_pow2(rank) and MIN_DIM <= rank <= 128 and _is_pow2(q_shape[-1]) and q_shape[-1] >= MIN_DIM
          and _pow2_divisor(dim, MAX_BLOCK_D) >= MIN_DIM and _is_pow2(chunk) and chunk >= MIN_DIM)


@dataclasses.dataclass(frozen=True)
class GateSpec:
  """Static settings of the gate kernels (a `nondiff_argnums` of the custom VJP)."""
  chunk: int
  heads: int
  dim_k: int
  normalizer: float = 16.0
  matmul_dtype: str = "float32"
  ieee: bool = False      # fp32 operands: IEEE dots (else TF32 / DEFAULT)
  warps: int = 4
  interpret: bool = False


def gate_spec(gate: LowRankGate, q_shape: tuple[int, ...], chunk: int, interpret: bool) -> GateSpec:
  context = jax.config.jax_default_matmul_precision
  ieee = context is not None and str(context).lower() in IEEE_CONTEXTS
  return GateSpec(chunk=chunk, heads=q_shape[2], dim_k=q_shape[3], normalizer=float(gate.normalizer),
                  matmul_dtype=gate.matmul_dtype, ieee=ieee, interpret=interpret)


# ---------------------------------------------------------------------------------------------- kernel bodies


def _dot(a, b, contract, spec: GateSpec):
  prec = jax.lax.Precision.HIGHEST if spec.ieee else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())), precision=prec,
                             preferred_element_type=jnp.float32)


def _log_sigmoid(u):
  return jnp.minimum(u, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(u)))


def _sigmoid_of_minus(u):  # sigmoid(-u) = d logsigmoid(u) / du, without overflow
  e = jnp.exp(-jnp.abs(u))
  return jnp.where(u >= 0, e, 1.0) / (1.0 + e)


def _logits(z_ref, wu_ref, b_ref, spec: GateSpec):
  """u = z W_up + b for one head: [C, K] fp32 (z and W_up in matmul_dtype, fp32 accumulation)."""
  dtype = jnp.dtype(spec.matmul_dtype)
  return _dot(z_ref[...].astype(dtype), wu_ref[...].astype(dtype), (1, 0), spec) + b_ref[...].astype(
      jnp.float32)


def _head_forward_kernel(z_ref, wu_ref, b_ref, g_ref, *, spec: GateSpec):
  """One (batch, chunk, head): G = cumsum(logsigmoid(z W_up + b) / normalizer) over the chunk's rows."""
  log_gate = _log_sigmoid(_logits(z_ref, wu_ref, b_ref, spec)) / spec.normalizer
  g_ref[...] = jnp.cumsum(log_gate, axis=0)


def _head_backward_kernel(z_ref, wu_ref, b_ref, dg_ref, dz_ref, dwu_ref, db_ref, *, spec: GateSpec):
  """One (batch, chunk, head): dG -> du = revcumsum(dG) * sigmoid(-u) / normalizer; this head's dz, and its
  share of dW_up and db."""
  dtype = jnp.dtype(spec.matmul_dtype)
  u = _logits(z_ref, wu_ref, b_ref, spec)
  d_cum = dg_ref[...]
  d_log_gate = jnp.sum(d_cum, axis=0, keepdims=True) - jnp.cumsum(d_cum, axis=0) + d_cum
  du = d_log_gate * _sigmoid_of_minus(u) / spec.normalizer
  db_ref[...] = jnp.sum(du, axis=0, keepdims=True)
  du = du.astype(dtype)
  dwu_ref[...] = _dot(z_ref[...].astype(dtype), du, (0, 0), spec)
  dz_ref[...] = _dot(du, wu_ref[...].astype(dtype), (1, 1), spec)


def _input_backward_kernel(x_ref, wd_ref, dz_ref, dx_ref, dwd_ref, *, spec: GateSpec):
  """One (batch, chunk, D tile): dz = sum over heads; dx = dz W_down^T and this chunk's share of x^T dz."""
  dtype = jnp.dtype(spec.matmul_dtype)
  rank = wd_ref.shape[-1]
  dz = None
  for head in range(spec.heads):
    part = dz_ref[:, pl.ds(head * rank, rank)]
    dz = part if dz is None else dz + part
  dz = dz.astype(dtype)
  dx_ref[...] = _dot(dz, wd_ref[...].astype(dtype), (1, 1), spec).astype(dx_ref.dtype)
  dwd_ref[...] = _dot(x_ref[...].astype(dtype), dz, (0, 0), spec)


# -------------------------------------------------------------------------------------------------- the calls


def _call(kernel, grid, in_specs, out_specs, out_shape, spec: GateSpec):
  return pl.pallas_call(functools.partial(kernel, spec=spec), grid=grid, in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, interpret=spec.interpret,
                        compiler_params=pltriton.CompilerParams(num_warps=spec.warps, num_stages=1))


def _head_specs(rank: int, spec: GateSpec):
  """z rows, W_up's and b's columns of one head, and G's (or dG's) columns of that head; grid (b, n, h)."""
  c, dk = spec.chunk, spec.dim_k
  return [pl.BlockSpec((None, c, rank), lambda i, n, h: (i, n, 0)),
          pl.BlockSpec((rank, dk), lambda i, n, h: (0, h)), pl.BlockSpec((1, dk), lambda i, n, h: (0, h)),
          pl.BlockSpec((None, c, dk), lambda i, n, h: (i, n, h))]


def _forward(x, w_down, w_up, b_up, spec: GateSpec):
  """(G, z): z = x W_down by XLA (one GEMM of ordinary shape), then one program per (batch, chunk, head)."""
  b, tokens, _ = x.shape
  rank, width = w_up.shape
  dtype = jnp.dtype(spec.matmul_dtype)
  z = jnp.dot(x.astype(dtype), w_down.astype(dtype))  # as the model's Dense; precision from the context
  z_spec, wu_spec, b_spec, g_spec = _head_specs(rank, spec)
  g = _call(_head_forward_kernel, (b, tokens // spec.chunk, spec.heads), [z_spec, wu_spec, b_spec], g_spec,
            jax.ShapeDtypeStruct((b, tokens, width), jnp.float32), spec)(z, w_up, b_up.reshape(1, width))
  return g, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def cumulative_low_rank_gate(x: Array, w_down: Array, w_up: Array, b_up: Array, spec: GateSpec) -> Array:
  """G [B, T, H*K] float32 for x [B, T, D] with T % spec.chunk == 0 (see the module docstring)."""
  return _forward(x, w_down, w_up, b_up, spec)[0]


def _vjp_fwd(x, w_down, w_up, b_up, spec):
  g, z = _forward(x, w_down, w_up, b_up, spec)
  return g, (x, z, w_down, w_up, b_up)


def _vjp_bwd(spec, residuals, d_cum):
  x, z, w_down, w_up, b_up = residuals
  b, tokens, dim = x.shape
  rank, width = w_up.shape
  c, nt, heads, dk = spec.chunk, tokens // spec.chunk, spec.heads, spec.dim_k
  # Per (batch, chunk, head): this head's dz and its shares of dW_up and db.
  dz, dwu, db = _call(
      _head_backward_kernel, (b, nt, heads), _head_specs(rank, spec),
      [pl.BlockSpec((None, c, rank), lambda i, n, h: (i, n, h)),
       pl.BlockSpec((None, None, rank, dk), lambda i, n, h: (i, n, 0, h)),
       pl.BlockSpec((None, None, 1, dk), lambda i, n, h: (i, n, 0, h))],
      [jax.ShapeDtypeStruct((b, tokens, heads * rank), jnp.float32),
       jax.ShapeDtypeStruct((b, nt, rank, width), jnp.float32),
       jax.ShapeDtypeStruct((b, nt, 1, width), jnp.float32)], spec)(
           z, w_up, b_up.reshape(1, width), d_cum.astype(jnp.float32))
  # Per (batch, chunk, D tile): dx and the chunk's share of dW_down.
  bd = _pow2_divisor(dim, MAX_BLOCK_D)
  dx, dwd = _call(
      _input_backward_kernel, (b, nt, dim // bd),
      [pl.BlockSpec((None, c, bd), lambda i, n, t: (i, n, t)),
       pl.BlockSpec((bd, rank), lambda i, n, t: (t, 0)),
       pl.BlockSpec((None, c, heads * rank), lambda i, n, t: (i, n, 0))],
      [pl.BlockSpec((None, c, bd), lambda i, n, t: (i, n, t)),
       pl.BlockSpec((None, None, bd, rank), lambda i, n, t: (i, n, t, 0))],
      [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, nt, dim, rank), jnp.float32)],
      spec)(x, w_down, dz)
  return (dx, dwd.sum((0, 1)).astype(w_down.dtype), dwu.sum((0, 1)).astype(w_up.dtype),
          db.sum((0, 1, 2)).astype(b_up.dtype))


cumulative_low_rank_gate.defvjp(_vjp_fwd, _vjp_bwd)
