"""Sub-chunk variants of the chunk-parallel GPU GLA kernels (`KernelConfig.intra="subchunk"`).

Same pallas_calls, grids, inputs and outputs as the level-scheme kernels in `gpu_kernels.py` (`gpu.py` picks
the module by `cfg.intra`); only the intra-chunk math is organised differently. Notation as there: G is the
chunk-local inclusive cumsum of the log gate (fp32, non-increasing along the chunk), A[r, c] = sum_k q[r,k]
k[c,k] exp(G[r,k] - G[c,k]) for c <= r.

Why: the level scheme computes each of its log2(C) levels as a full C x C x K product of which one level owns
a small share of the pairs (at C = 64 the six products cover 2016 useful of 24576 computed pairs), so the
output and dv kernels spend ~7 C x C x K products per chunk where ~2 would do. Here each chunk splits into
sub-chunks of S rows (16, fla's secondary chunking) and every kernel walks them, writing S output rows at a
time:

- pairs in different sub-chunks (query sub-chunk i, key rows before it) share one reference row, the last
  key row n = iS - 1: exp(G_r - G_c) = exp(G_r - G_n) * exp(G_n - G_c), both exponents <= 0, so the block
  row is one [S, K] x [K, P] product with P = the rows before i rounded up to a power of two (Triton blocks);
  the rows past iS are masked. The dv and dk sides walk key sub-chunks j and use the last row of j as the
  reference for the query rows after it (a power-of-two suffix of the chunk);
- the S x S diagonal blocks use the level scheme of `gpu_kernels._scores` inside the sub-chunk (log2 S = 4
  levels of [S, K] x [K, S]).

At C = 64, K = V = 64 the output kernel does ~200 instead of ~512 multiply-add units (16^3) per chunk and the
same number of exps per (token, channel) up to one; no positive number is ever exponentiated (every exponent
is clamped at 0, so gates of any size <= 0 stay finite). As in the level scheme the factors are rounded to
bf16 for the tensor cores for bf16 inputs, the diagonal is an exact fp32 row dot, and h_n / D_n come from the
shared state kernels. Only the two-kernel backward (`grad_version=2`) exists in this scheme.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gla import gpu_kernels as gk
from pallas_kernels.gla.gpu_kernels import KernelConfig

Array = jax.Array
_exp, _iota, _mm, _mm_nt, _mm_tn = gk._exp, gk._iota, gk._mm, gk._mm_nt, gk._mm_tn


def _next_pow2(n: int) -> int:
  return 1 << (n - 1).bit_length()


def sub_chunks(cfg: KernelConfig) -> tuple[int, int]:
  """(S, C // S): the sub-chunk size (at most the chunk) and the number of sub-chunks per chunk."""
  s = min(cfg.sub_chunk, cfg.chunk_size)
  return s, cfg.chunk_size // s


def _prefix_len(i: int, s: int) -> int:
  """Rows 0 .. P-1 hold the i*S rows before sub-chunk i (P a power of two; the rest is masked)."""
  return _next_pow2(i * s)


def _suffix_start(j: int, s: int, c: int) -> int:
  """Rows start .. C-1 hold the rows after sub-chunk j (C - start a power of two; the rest is masked)."""
  return c - _next_pow2(c - (j + 1) * s)


def _ds(base, offset: int, size: int):
  """pl.ds(base + offset, size); `base` is 0 (chunk-parallel kernels) or a traced chunk start (fused)."""
  start = base + offset
  return pl.ds(start if isinstance(start, int) else pl.multiple_of(start, size), size)


def _decayed(x, g, g_ref_row, sign: int, mm_dtype) -> Array:
  """x * exp(min(sign * (G - G_ref), 0)) in the matmul dtype (`sign` +1: query side, -1: key side)."""
  diff = g - g_ref_row[None, :] if sign > 0 else g_ref_row[None, :] - g
  return (x.astype(jnp.float32) * _exp(jnp.minimum(diff, 0.0))).astype(mm_dtype)


# ------------------------------------------------------------------------------------------------- forward


def query_block_output(q_ref, k_ref, v_ref, g_ref, h_tile, base, i: int, cfg: KernelConfig, mm_dtype,
                       prec) -> Array:
  """F3 for the rows of query sub-chunk i of the chunk starting at `base`: scale * o, fp32 [S, V tile].

  `h_tile(cols)` gives the rows `cols` of the state h_n (K contracted in tiles of `cfg.score_block_k`).
  """
  s, _ = sub_chunks(cfg)
  rows = _ds(base, i * s, s)
  prefix = _ds(base, 0, _prefix_len(i, s)) if i else None
  acc = None
  for cols in gk._k_tiles(q_ref.shape[-1], cfg.score_block_k):
    qf, kf, g = q_ref[rows, cols].astype(jnp.float32), k_ref[rows, cols].astype(jnp.float32), g_ref[rows, cols]
    terms = [_mm((qf * _exp(g)).astype(mm_dtype), h_tile(cols).astype(mm_dtype), prec),
             gk._scores(qf, kf, g, g_ref, base + i * s, s, mm_dtype, prec, cols)]
    if i:
      g_n = g_ref[base + i * s - 1, cols]
      terms.append(_mm_nt(_decayed(qf, g, g_n, 1, mm_dtype),
                          _decayed(k_ref[prefix, cols], g_ref[prefix, cols], g_n, -1, mm_dtype), prec))
    acc = terms if acc is None else [a + t for a, t in zip(acc, terms)]
  o = acc[0] + _mm(acc[1].astype(mm_dtype), v_ref[rows, :].astype(mm_dtype), prec)
  if i:
    earlier = jnp.where(_iota((1, _prefix_len(i, s)), 1) < i * s, acc[2], 0.0)
    o = o + _mm(earlier.astype(mm_dtype), v_ref[prefix, :].astype(mm_dtype), prec)
  return o * cfg.scale


def out_kernel(q_ref, k_ref, v_ref, g_ref, h_ref, o_ref, *, cfg, mm_dtype, prec):
  """F2/F3 for one chunk and one V tile, S rows at a time."""
  s, num_sub = sub_chunks(cfg)
  for i in range(num_sub):
    o = query_block_output(q_ref, k_ref, v_ref, g_ref, lambda cols: h_ref[cols, :], 0, i, cfg, mm_dtype, prec)
    o_ref[pl.ds(i * s, s), :] = o.astype(o_ref.dtype)


def fused_fwd_kernel(q_ref, k_ref, v_ref, g_ref, o_ref, *hs_refs, cfg, num_chunks, mm_dtype, prec):
  """The fused sequential forward (see `gpu_kernels.fused_fwd_kernel`) with sub-chunk outputs."""
  c = cfg.chunk_size
  s, num_sub = sub_chunks(cfg)

  def load(n):
    rows = gk._rows(n, c)
    return k_ref[rows, :], v_ref[rows, :], g_ref[rows, :], g_ref[n * c + c - 1, :]

  def step(n, h, chunk):
    if hs_refs:
      hs_refs[0][n] = h.astype(hs_refs[0].dtype)
    base = pl.multiple_of(n * c, c)
    for i in range(num_sub):
      o = query_block_output(q_ref, k_ref, v_ref, g_ref, lambda cols: h[cols, :], base, i, cfg, mm_dtype,
                             prec)
      o_ref[_ds(base, i * s, s), :] = o.astype(o_ref.dtype)
    return gk._state_update(h, *chunk, mm_dtype, prec)

  h0 = jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
  gk._sequential(num_chunks, load, step, h0, cfg.prefetch)


# ------------------------------------------------------------------------------------------------ backward


def dv_kernel(q_ref, k_ref, g_ref, do_ref, d_ref, dv_ref, *, cfg, mm_dtype, prec):
  """B3 for one chunk and one V tile, S key rows at a time: dv_j = (A^T do)_j + (k e^(gamma - G))_j D_n."""
  c = cfg.chunk_size
  s, num_sub = sub_chunks(cfg)
  for j in range(num_sub):
    rows = pl.ds(j * s, s)
    last = j + 1 < num_sub
    start = _suffix_start(j, s, c)
    later = pl.ds(start, c - start)
    acc = None
    for cols in gk._k_tiles(q_ref.shape[-1], cfg.score_block_k):
      kf, g = k_ref[rows, cols].astype(jnp.float32), g_ref[rows, cols]
      g_last = g_ref[c - 1, cols]
      terms = [_mm((kf * _exp(g_last[None, :] - g)).astype(mm_dtype), d_ref[cols, :].astype(mm_dtype), prec),
               gk._scores(q_ref[rows, cols].astype(jnp.float32), kf, g, g_ref, j * s, s, mm_dtype, prec, cols)]
      if last:  # A[later rows, rows of j]^T through the reference row m = the last row of j
        g_m = g_ref[(j + 1) * s - 1, cols]
        terms.append(_mm_nt(_decayed(kf, g, g_m, -1, mm_dtype),
                            _decayed(q_ref[later, cols], g_ref[later, cols], g_m, 1, mm_dtype), prec))
      acc = terms if acc is None else [a + t for a, t in zip(acc, terms)]
    dv = acc[0] + _mm_tn((acc[1] * cfg.scale).astype(mm_dtype), do_ref[rows, :].astype(mm_dtype), prec)
    if last:
      after = jnp.where(start + _iota((1, c - start), 1) >= (j + 1) * s, acc[2] * cfg.scale, 0.0)
      dv = dv + _mm(after.astype(mm_dtype), do_ref[later, :].astype(mm_dtype), prec)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)


def dqk_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, h_ref, d_ref, dq_ref, dk_ref, dg_ref, *, cfg, mm_dtype,
               prec):
  """B2, B4-B6 for one chunk and one K tile, S rows at a time: sub-chunk i's dq takes the dA rows of i
  against the rows before it, its dk the dA columns of i against the rows after it; the diagonal block
  goes through `gpu_kernels.diag_block_grads`. dG = q dq - k dk, plus delta on the chunk's last row."""
  c, scale = cfg.chunk_size, cfg.scale
  s, num_sub = sub_chunks(cfg)
  dim_v = v_ref.shape[-1]
  bv = min(cfg.grad_block_v, dim_v)
  v_tiles = [pl.ds(t * bv, bv) for t in range(dim_v // bv)]

  def contract_v(a_ref, a_rows, b_ref, b_rows):  # a[a_rows] @ b[b_rows]^T over V tiles, fp32
    return sum(_mm_nt(a_ref[a_rows, t].astype(mm_dtype), b_ref[b_rows, t].astype(mm_dtype), prec)
               for t in v_tiles)

  g_last = g_ref[c - 1, :]
  hd = sum(jnp.sum(h_ref[:, t].astype(jnp.float32) * d_ref[:, t].astype(jnp.float32), axis=1)
           for t in v_tiles)
  delta = _exp(g_last) * hd
  whole = pl.ds(0, h_ref.shape[0])
  for i in range(num_sub):
    rows = pl.ds(i * s, s)
    qf, kf, g = q_ref[rows, :].astype(jnp.float32), k_ref[rows, :].astype(jnp.float32), g_ref[rows, :]
    dq = contract_v(do_ref, rows, h_ref, whole) * (_exp(g) * scale)      # s (do h^T) e^G
    dk = contract_v(v_ref, rows, d_ref, whole) * _exp(g_last[None, :] - g)  # (v D^T) e^(gamma - G)
    delta = delta + jnp.sum(kf * dk, axis=0)
    r, col = _iota((s, 1), 0), _iota((1, s), 1)
    d_a = jnp.where(r >= col, contract_v(do_ref, rows, v_ref, rows) * scale, 0.0)
    dq_diag, dk_diag = gk.diag_block_grads(d_a, qf, kf, g, g_ref, i * s, s, mm_dtype, prec)
    dq, dk = dq + dq_diag, dk + dk_diag
    if i:  # earlier sub-chunks, reference row n = i*S - 1
      size = _prefix_len(i, s)
      prefix, g_n = pl.ds(0, size), g_ref[i * s - 1, :]
      d_a = jnp.where(_iota((1, size), 1) < i * s, contract_v(do_ref, rows, v_ref, prefix) * scale, 0.0)
      k_hat = _decayed(k_ref[prefix, :], g_ref[prefix, :], g_n, -1, mm_dtype)
      dq = dq + _mm(d_a.astype(mm_dtype), k_hat, prec) * _exp(jnp.minimum(g - g_n[None, :], 0.0))
    if i + 1 < num_sub:  # later sub-chunks, reference row m = the last row of i
      start = _suffix_start(i, s, c)
      later, g_m = pl.ds(start, c - start), g_ref[(i + 1) * s - 1, :]
      d_a_t = contract_v(v_ref, rows, do_ref, later) * scale     # dA[later rows, rows of i]^T
      d_a_t = jnp.where(start + _iota((1, c - start), 1) >= (i + 1) * s, d_a_t, 0.0)
      q_hat = _decayed(q_ref[later, :], g_ref[later, :], g_m, 1, mm_dtype)
      dk = dk + _mm(d_a_t.astype(mm_dtype), q_hat, prec) * _exp(jnp.minimum(g_m[None, :] - g, 0.0))
    dg = qf * dq - kf * dk
    if i + 1 == num_sub:
      dg = jnp.where(_iota((s, 1), 0) == s - 1, dg + delta[None, :], dg)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dg_ref[rows, :] = dg
