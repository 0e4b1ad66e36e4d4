"""Pure-JAX references for gated linear attention (GLA).

Semantics are those of fla's `naive_recurrent_gla`, which DiG's GLA layer uses (see
`shared/reference/gla_kernels.md` §1): per batch and head, with q_t, k_t in R^K, v_t in R^V and a per-key-channel
log forget gate g_t <= 0,

    S_0 = h0 (or 0),   S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = (scale * q_t) S_t,

so the decay is applied before the new key/value is added and the output is read from the updated state.
`scale` defaults to K**-0.5. All tensors are `[batch, tokens, heads, dim]`; the state is kept in float32 whatever
the input dtype, and the output is cast back to `v.dtype`.

Two forms live here:
- `recurrent_gla`: token by token with `lax.scan`. The oracle; slow (T sequential steps), fine for tests.
- `chunked_gla`: `lax.scan` over chunks of C tokens. Inside a chunk the cumulative log gate G is chunk-local
  (so exp(G) <= 1), the inter-chunk terms use exp(G) and exp(G_C - G) (exponents <= 0), and the intra-chunk scores
  use the exact pairwise decay exp(G_r - G_c) masked to c <= r *before* the exponential, so no exponent is ever
  positive and nothing overflows for any gate. Any T (padded to a multiple of C with zero q/k/v and a zero log
  gate, which leaves real outputs and the final state untouched), any chunk size, differentiable with `jax.grad`.
  It is the portable fallback used on every backend and the reference every kernel is tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_CHUNK_SIZE = 64


def _check_shapes(q: Array, k: Array, v: Array, log_gate: Array, initial_state: Array | None) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or log_gate.ndim != 4:
    raise ValueError(
        "gla expects [batch, tokens, heads, dim] tensors; got q%s k%s v%s log_gate%s"
        % (q.shape, k.shape, v.shape, log_gate.shape))
  if q.shape != k.shape or q.shape != log_gate.shape:
    raise ValueError(f"q, k and log_gate must have one shape; got {q.shape}, {k.shape}, {log_gate.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must match q in batch, tokens and heads; got v{v.shape} vs q{q.shape}")
  if initial_state is not None:
    b, _, h, dk = q.shape
    expected = (b, h, dk, v.shape[-1])
    if initial_state.shape != expected:
      raise ValueError(f"initial_state must be [batch, heads, K, V] = {expected}; got {initial_state.shape}")


def _zero_state(q: Array, v: Array) -> Array:
  b, _, h, dk = q.shape
  return jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)


def recurrent_gla(
    q: Array,
    k: Array,
    v: Array,
    log_gate: Array,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    precision: jax.lax.Precision | str | None = jax.lax.Precision.HIGHEST,
) -> Array | tuple[Array, Array]:
  """Token-by-token GLA (the oracle). Shapes: q, k, log_gate [B,T,H,K]; v [B,T,H,V]; state [B,H,K,V]."""
  _check_shapes(q, k, v, log_gate, initial_state)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  state0 = _zero_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)
  # Time-major, float32.
  xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, log_gate))

  def step(state, x):
    q_t, k_t, v_t, g_t = x  # [B,H,K], [B,H,K], [B,H,V], [B,H,K]
    state = state * jnp.exp(g_t)[..., None] + k_t[..., :, None] * v_t[..., None, :]
    o_t = jnp.einsum("bhk,bhkv->bhv", q_t * scale, state, precision=precision)
    return state, o_t

  final_state, o = jax.lax.scan(step, state0, xs)
  o = jnp.moveaxis(o, 0, 1).astype(v.dtype)
  return (o, final_state) if return_final_state else o


def pad_to_chunks(x: Array, chunk_size: int) -> Array:
  """Zero-pads the token axis (axis 1) up to a multiple of `chunk_size`."""
  pad = (-x.shape[1]) % chunk_size
  if pad == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))


CUMSUM_METHODS = ("scan", "matmul")


def chunk_local_cumsum(log_gate: Array, chunk_size: int, method: str = "scan") -> Array:
  """Inclusive cumulative sum of the log gate inside each chunk, in float32. T must be a multiple of C.

  method "scan": `jnp.cumsum` over the chunk axis. "matmul": the same sums as one batched fp32 GEMM, a
  lower-triangular ones matrix times each chunk's [C, H*D] gates at HIGHEST precision (exact products of ones,
  fp32 accumulation in another order: equal to within fp32 rounding, ~1e-7 relative). The ones matrix carries
  an explicit batch axis (one copy per chunk): without it XLA transposes the gates around the GEMM, which made
  it slower than the scan. Its transpose, the reverse cumsum of the backward pass, is again one batched GEMM.
  On an H100 the GEMM form takes 0.08 / 0.15 ms where the scan takes 0.14 / 0.28 ms (B8 T12544 H6, K = 32 /
  64; `benchmarks/gla_kernel.py --mode cumsum`, pallas_kernels/gla/NOTES.md session 6), so the GPU kernels'
  wrapper uses it from 4096 tokens up (`gpu.tuned_config`; inside a model, where XLA fuses the scan into the
  gate's own math, the two tied at 4096 tokens and the scan won at 256). The default here stays the scan (the
  XLA reference path, CPU, TPU: unmeasured).
  """
  if method not in CUMSUM_METHODS:
    raise ValueError(f"cumsum method must be one of {CUMSUM_METHODS}; got {method!r}")
  if method == "matmul":
    return tril_matmul_cumsum(log_gate, chunk_size, jax.lax.Precision.HIGHEST)
  b, t, h, d = log_gate.shape
  cum = jnp.cumsum(log_gate.astype(jnp.float32).reshape(b * t // chunk_size, chunk_size, h, d), axis=1)
  return cum.reshape(b, t, h, d)


def tril_matmul_cumsum(log_gate: Array, chunk_size: int, precision) -> Array:
  """`chunk_local_cumsum`'s "matmul" form under any dot `precision` (benchmarks compare dot algorithms)."""
  b, t, h, d = log_gate.shape
  n, c = b * t // chunk_size, chunk_size
  ones = jnp.broadcast_to(jnp.tril(jnp.ones((c, c), jnp.float32)), (n, c, c))
  g = log_gate.astype(jnp.float32).reshape(n, c, h * d)
  return jnp.einsum("xrc,xcj->xrj", ones, g, precision=precision).reshape(b, t, h, d)


def chunked_gla(
    q: Array,
    k: Array,
    v: Array,
    log_gate: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    scale: float | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    precision: jax.lax.Precision | str | None = None,
) -> Array | tuple[Array, Array]:
  """Chunkwise-parallel GLA in pure JAX (see the module docstring). Same contract as `recurrent_gla`."""
  _check_shapes(q, k, v, log_gate, initial_state)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  c = chunk_size
  qf, kf, vf, gf = (pad_to_chunks(x.astype(jnp.float32), c) for x in (q, k, v, log_gate))
  n = qf.shape[1] // c
  cum = chunk_local_cumsum(gf, c)

  def to_chunks(x):  # [B, N*C, H, D] -> [N, B, H, C, D]
    return x.reshape(b, n, c, h, x.shape[-1]).transpose(1, 0, 3, 2, 4)

  causal = jnp.tril(jnp.ones((c, c), dtype=bool))

  def step(state, x):
    q_n, k_n, v_n, g_n = x  # [B,H,C,K] x3 (v: V), g_n is the chunk-local cumsum
    g_last = g_n[:, :, -1:, :]  # [B,H,1,K]
    # Inter-chunk: contribution of the state entering this chunk (None: a known-zero state, see below).
    o_inter = 0.0 if state is None else jnp.einsum("bhck,bhkv->bhcv", q_n * jnp.exp(g_n), state,
                                                    precision=precision)
    # Intra-chunk: exact pairwise decay, masked before the exponential (exponents <= 0 everywhere).
    diff = g_n[:, :, :, None, :] - g_n[:, :, None, :, :]  # [B,H,C(query),C(key),K]
    decay = jnp.exp(jnp.where(causal[:, :, None], diff, -jnp.inf))
    scores = jnp.einsum("bhrk,bhck,bhrck->bhrc", q_n, k_n, decay, precision=precision)
    o_intra = jnp.einsum("bhrc,bhcv->bhrv", scores, v_n, precision=precision)
    o_n = (o_inter + o_intra) * scale
    # State update: S <- diag(exp(G_C)) S + (k * exp(G_C - G))^T v.
    k_decayed = k_n * jnp.exp(g_last - g_n)
    new_state = jnp.einsum("bhck,bhcv->bhkv", k_decayed, v_n, precision=precision)
    if state is not None:
      new_state = new_state + state * jnp.exp(g_last)[:, :, 0, :, None]
    return new_state, o_n

  chunks = tuple(to_chunks(x) for x in (qf, kf, vf, cum))
  if initial_state is None:
    # The first chunk starts from a zero state: peel it off the scan instead of multiplying by a zero constant.
    # Besides saving work, this avoids an XLA:CPU bug in jaxlib 0.11.2 (its experimental "ynn" dot fusion
    # returns garbage for a dot whose operand is a broadcast constant, which is what a one-chunk scan over a
    # zero initial state becomes once XLA unrolls it).
    state1, o_first = step(None, tuple(x[0] for x in chunks))
    final_state, o_rest = jax.lax.scan(step, state1, tuple(x[1:] for x in chunks))
    o = jnp.concatenate([o_first[None], o_rest], axis=0)
  else:
    final_state, o = jax.lax.scan(step, initial_state.astype(jnp.float32), chunks)
  o = o.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, dv)[:, :t].astype(v.dtype)
  return (o, final_state) if return_final_state else o
