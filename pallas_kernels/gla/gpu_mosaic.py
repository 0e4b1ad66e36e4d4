"""The GLA forward written for Mosaic GPU (`plgpu.kernel`, wgmma, TMA): a state pass and an output pass.

Why it exists: issue #4 asks to choose between Pallas' Triton lowering (deprecated upstream; all of `gpu.py`'s
other kernels) and Mosaic GPU (the maintained lowering, with Hopper's wgmma and TMA) by measurement. The
forward was the part furthest from its HBM floor, so it was ported first; measured against the Triton kernels
on the same inputs (`benchmarks/gla_mosaic.py`, H100, NOTES.md session 11) it is 1.4x faster at B8 T12544
32/64, and `gpu` runs it for forwards without a gradient from `MOSAIC_FORWARD_MIN_TOKENS` tokens
(`KernelConfig.forward_backend`). The VJP's forward and the backward stay on the Triton kernels.

Kernels (one warpgroup per CTA; notation of `gpu_kernels`: G the chunk-local cumulative log gate, gamma = G at
a chunk's last row, m the chunk's middle row):
- `state_pass`: grid (batch, head, segment); a TMA pipeline (`plgpu.emit_pipeline`, two chunks in flight)
  walks the segment's chunks from a zero state held in registers as a wgmma accumulator, stores the state
  entering every chunk (bf16) and the segment's end state (fp32). The accumulator is the state transposed,
  h^T [V, K], so that the update h^T <- h^T e^gamma + v^T (k e^(gamma - G)) is a wgmma with M = V = 64 (wgmma
  needs M % 64 == 0; DiG's K = 32 is not). Segments: `gpu.SegmentedStates`' scheme (their join is folded into
  the output pass). `state_pass_from_log_gate` (session 12) reads the log gate instead of G, forms G and gamma
  with exact bf16-part wgmmas (`_gate_sums`) and writes G for the output pass, so that the op's forward has
  no XLA cumsum pass.
- `out_pass`: grid (batch, head, chunk);
      o = scale * ((q e^G) h_n + mask_{r >= c}[A] v),
  the inter-chunk product a bf16 wgmma, the intra-chunk scores A as in `gpu_kernels._scores` (`_scores`
  here: one reference row, or the levels beyond the span limit) with fp32 operands (tf32 wgmma, as the
  Triton kernel's DEFAULT-precision fp32 dots), A rounded to bf16 for A v. It reads states as [K, V]
  (`gpu._states`' unsegmented output) or as this module's transposed, segmented ones.

Scope: bf16 inputs, chunk 64, K in {32, 64}, V = 64 (`supported`), forward only. Mosaic GPU's interpreter has
no wgmma rule (JAX 0.11), so CPU tests lower the kernels for an H100 and GPU tests check their values.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gla import gpu_kernels, segment_join

Array = jax.Array
LOG2E = math.log2(math.e)
CHUNK = 64
WGMMA = plgpu.Layout.WGMMA
ROW_VECTOR = plgpu.Layout.WGMMA.reduce(0)   # a [cols] vector that broadcasts along the rows of a WGMMA tile
SPAN_LIMIT = gpu_kernels.SPAN_LIMIT


def supported(q_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype, chunk_size: int) -> bool:
  """Shapes and dtypes these kernels handle."""
  return (jnp.dtype(dtype) == jnp.bfloat16 and chunk_size == CHUNK and q_shape[-1] in (32, 64)
          and v_shape[-1] == 64 and q_shape[1] % CHUNK == 0)


def _check(name: str, v: Array, g: Array, *qk: Array) -> None:
  """q and k (or k alone) [B, T, H, K] and v [B, T, H, V] bf16, g [B, T, H, K] fp32, within `supported`."""
  ok = (all(x.shape == g.shape and x.dtype == jnp.bfloat16 for x in qk) and g.dtype == jnp.float32
        and supported(g.shape, v.shape, v.dtype, CHUNK) and g.shape[:3] == v.shape[:3])
  if not ok:
    raise ValueError(f"gpu_mosaic.{name}: bf16 q/k/v with K in (32, 64), V = 64, T % 64 == 0, and an fp32 "
                     f"gate of q's and k's shape; got q/k {[(x.shape, str(x.dtype)) for x in qk]}, "
                     f"v {v.shape} {v.dtype}, g {g.shape} {g.dtype}")


def _swizzle(width: int, dtype) -> int:
  return min(128, width * jnp.dtype(dtype).itemsize)


def _transforms(swizzle: int, dtype) -> tuple:
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _smem(shape: tuple[int, int], dtype, swizzle: int | None = None):
  """A wgmma-ready SMEM tile: 8-row tiling and a swizzle (default: the widest, <= 128 B, that a row allows;
  a wgmma's two SMEM operands must share one)."""
  return plgpu.SMEM(shape, dtype, transforms=_transforms(swizzle or _swizzle(shape[1], dtype), dtype))


def _exp(x: Array) -> Array:
  return jnp.exp2(x * LOG2E)


def _zeros(shape: tuple[int, int]) -> Array:
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), WGMMA)


def _rows_broadcast(vector: Array, shape: tuple[int, int]) -> Array:
  return jax.lax.broadcast_in_dim(vector, shape, (1,))


class TransposedStates(NamedTuple):
  """`state_pass`'s states: h_n^T = local[n] + decay[n] * carry[segment of n] (decay along K, the columns)."""
  local: Array   # [B, NT, H, V, K] bf16: what the segment's own chunks put into h_n, transposed
  carry: Array   # [B, S, H, V, K] fp32: the state entering each segment, transposed
  decay: Array   # [B, NT, H, K] fp32: e^(sum of the log decays between the segment's start and chunk n)


def _iotas(shape: tuple[int, int]) -> tuple[Array, Array]:
  return tuple(plgpu.broadcasted_iota(jnp.int32, shape, d, layout=WGMMA) for d in (0, 1))


def _store_bf16_parts(x: Array, parts: tuple) -> None:
  """x (fp32) as three bf16 SMEM tiles whose sum is x to fp32 precision (8 + 8 + 8 mantissa bits): a 0/1
  matrix times the parts in bf16 wgmmas (exact products, fp32 accumulation) then sums rows of x exactly.
  Starts with a warpgroup barrier: the tiles may be ones whose values every thread has just loaded."""
  plgpu.commit_smem()
  hi = x.astype(jnp.bfloat16)
  rest = x - hi.astype(jnp.float32)
  mid = rest.astype(jnp.bfloat16)
  for part_s, part in zip(parts, (hi, mid, (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16))):
    part_s[...] = part
  plgpu.commit_smem()


def _select_rows(matrix, parts: tuple, shape: tuple[int, int]) -> Array:
  """matrix [C, C] (0/1, bf16; registers or an SMEM tile) times the x whose bf16 parts are in `parts`,
  fp32 [C, K]."""
  def product(acc):
    for part_s in parts:
      plgpu.wgmma(acc, matrix, part_s)
  return pl.run_state(product)(plgpu.ACC.init(_zeros(shape)))


def _ones_up_to(column: Array | int) -> Array:
  """[C, C] bf16 0/1 matrix with ones where col <= `column` (an int, or the row index for the lower
  triangle): times a tile x (`_select_rows`) it gives x's inclusive cumsum down to that row in every row."""
  _, col = _iotas((CHUNK, CHUNK))
  return jnp.where(col <= column, 1.0, 0.0).astype(jnp.bfloat16)


def _gate_sums(log_gate: Array, parts: tuple, selectors: tuple) -> list[Array]:
  """In-kernel sums of a raw log gate tile [C, K] (Mosaic GPU has no cumsum lowering): each of `selectors`
  (SMEM tiles of `_ones_up_to` matrices) times the gate, fp32 [C, K], through the gate's exact bf16 parts.
  With the lower triangle: G, the chunk-local cumsum; with all ones: gamma, the chunk's total, in every row.
  The selectors sit in SMEM, written once per kernel: built in registers as the wgmma's A operand (as the
  output pass's levels do), the first chunk's G came out wrong in some rows on the H100 and H200 (session
  12, not understood)."""
  _store_bf16_parts(log_gate, parts)
  return [_select_rows(selector, parts, log_gate.shape) for selector in selectors]


# --------------------------------------------------------------------------------------------- state pass


def state_pass(k: Array, v: Array, g: Array, segments: int = 1) -> TransposedStates:
  """Every chunk's entering state from G (the chunk-local cumulative log gate), in `segments` (a divisor of
  the chunk count) run in parallel."""
  gamma = g[:, CHUNK - 1::CHUNK]                              # [B, NT, H, K]: each chunk's total log decay
  local, ends = _state_kernel(k, v, g, segments, gamma)
  return _join(local, ends, gamma)


def state_pass_from_log_gate(k: Array, v: Array, log_gate: Array,
                             segments: int = 1) -> tuple[TransposedStates, Array]:
  """`state_pass` from the (chunk-padded) log gate itself: the kernel forms G (`_gate_sums`) and writes it
  for the output pass, so that no cumsum pass runs before the kernels. Returns (states, G)."""
  local, ends, g = _state_kernel(k, v, log_gate, segments, gamma=None)
  return _join(local, ends, g[:, CHUNK - 1::CHUNK]), g


def _state_kernel(k: Array, v: Array, g: Array, segments: int, gamma: Array | None) -> tuple[Array, ...]:
  """The state pass's kernel: (local states, segment end states) from G and its last rows `gamma`; with
  `gamma` None, g is the log gate and the kernel forms G and gamma itself and also returns G."""
  raw_gate = gamma is None
  batch, tokens, heads, dim_k = k.shape
  dim_v = v.shape[-1]
  _check("state_pass", v, g, k)
  c, nt = CHUNK, tokens // CHUNK
  if nt % segments:
    raise ValueError(f"segments ({segments}) must divide the chunk count ({nt})")
  per_seg = nt // segments
  sw = _swizzle(dim_k, jnp.bfloat16)                          # v^T and k~ are one wgmma's operands
  g_transforms = _transforms(_swizzle(dim_k, jnp.float32), jnp.float32)

  def body(*refs):
    if raw_gate:
      k_gmem, v_gmem, g_gmem, hs_gmem, end_gmem, g_out_gmem, kd_s, end_s, lower_s, ones_s, *parts = refs
      lower_s[...] = _ones_up_to(_iotas((c, c))[0])
      ones_s[...] = _ones_up_to(c - 1)
      plgpu.commit_smem()
    else:
      k_gmem, v_gmem, g_gmem, gamma_gmem, hs_gmem, end_gmem, kd_s, end_s = refs
    b, h, s = jax.lax.axis_index("b"), jax.lax.axis_index("h"), jax.lax.axis_index("s")
    rows, chunks = pl.ds(s * per_seg * c, per_seg * c), pl.ds(s * per_seg, per_seg)

    def step(_, k_s, v_s, g_s, *refs):
      *io_s, acc = refs
      if raw_gate:               # G and gamma (in every row) from the raw gate; dim_v == C, so one shape
        h_out_s, g_out_s = io_s
        gate, gam_rows = _gate_sums(g_s[...], parts, (lower_s, ones_s))
        g_out_s[...] = gate
      else:
        gamma_s, h_out_s = io_s
        gate = g_s[...]
        gam_rows = _rows_broadcast(plgpu.load(gamma_s, layout=ROW_VECTOR), (c, dim_k))
      h_out_s[...] = acc.astype(h_out_s.dtype)               # the state entering this chunk
      kd_s[...] = (k_s[...].astype(jnp.float32) * _exp(gam_rows - gate)).astype(kd_s.dtype)
      plgpu.commit_smem()
      acc = acc * _exp(gam_rows)                              # [V, K] with V == C (`supported`)

      def update(acc_ref):
        plgpu.wgmma(acc_ref, v_s.transpose((1, 0)), kd_s)
      return pl.run_state(update)(plgpu.ACC.init(acc))

    in_specs = [plgpu.BlockSpec((c, dim_k), lambda i: (i, 0), transforms=_transforms(sw, jnp.bfloat16)),
                plgpu.BlockSpec((c, dim_v), lambda i: (i, 0), transforms=_transforms(sw, jnp.bfloat16)),
                plgpu.BlockSpec((c, dim_k), lambda i: (i, 0), transforms=g_transforms)]
    out_specs = [plgpu.BlockSpec((None, dim_v, dim_k), lambda i: (i, 0, 0),
                                 transforms=_transforms(sw, jnp.bfloat16))]
    gmems = [k_gmem.at[b, rows, h], v_gmem.at[b, rows, h], g_gmem.at[b, rows, h]]
    if raw_gate:
      out_specs.append(plgpu.BlockSpec((c, dim_k), lambda i: (i, 0), transforms=g_transforms))
      gmems += [hs_gmem.at[b, chunks, h], g_out_gmem.at[b, rows, h]]
    else:
      in_specs.append(plgpu.BlockSpec((None, dim_k), lambda i: (i, 0)))
      gmems += [gamma_gmem.at[b, chunks, h], hs_gmem.at[b, chunks, h]]
    pipeline = plgpu.emit_pipeline(step, grid=(per_seg,), max_concurrent_steps=2, in_specs=in_specs,
                                   out_specs=out_specs, init_carry=_zeros((dim_v, dim_k)))
    end_s[...] = pipeline(*gmems)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(end_s, end_gmem.at[b, s, h])
    plgpu.wait_smem_to_gmem(0)

  out_type = [jax.ShapeDtypeStruct((batch, nt, heads, dim_v, dim_k), jnp.bfloat16),
              jax.ShapeDtypeStruct((batch, segments, heads, dim_v, dim_k), jnp.float32)]
  scratch = [_smem((c, dim_k), jnp.bfloat16, sw), _smem((dim_v, dim_k), jnp.float32)]
  if raw_gate:
    out_type.append(jax.ShapeDtypeStruct(g.shape, jnp.float32))
    scratch += [_smem((c, c), jnp.bfloat16, sw) for _ in range(2)]      # the selectors, A of the wgmmas
    scratch += [_smem((c, dim_k), jnp.bfloat16, sw) for _ in range(3)]
    operands = (k, v, g)
  else:
    operands = (k, v, g, gamma)
  return plgpu.kernel(
      body, out_type=tuple(out_type), grid=(batch, heads, segments), grid_names=("b", "h", "s"),
      scratch_types=scratch, compiler_params=plgpu.CompilerParams(approx_math=True))(*operands)


def _join(local: Array, ends: Array, gamma: Array) -> TransposedStates:
  """The parts of a segmented pass's transposed (V x K) states (`segment_join.join`, forward)."""
  return TransposedStates(local, *segment_join.join(ends, gamma, reverse=False, k_axis=-1))


# -------------------------------------------------------------------------------------------- output pass


def _score_product(qt_s, kt_s, q_factor: Array, k_factor: Array) -> Array:
  """(q_factor) (k_factor)^T through SMEM, one wgmma with fp32 (tf32) operands, [C, C] fp32."""
  qt_s[...] = q_factor
  kt_s[...] = k_factor
  plgpu.commit_smem()

  def product(acc):
    plgpu.wgmma(acc, qt_s, kt_s.transpose((1, 0)))
  return pl.run_state(product)(plgpu.ACC.init(_zeros((CHUNK, CHUNK))))


def _scores(qf: Array, kf: Array, gate: Array, diff: Array, qt_s, kt_s, g_parts: tuple,
            fallback: bool) -> Array:
  """The chunk's intra-chunk scores A[r, c] = sum_k q[r,k] k[c,k] e^(G[r,k] - G[c,k]) for c <= r, else 0.

  One reference row (the middle, `diff` = G - G_m) where the chunk's decay span max|G - G_m| is within
  `gpu_kernels.SPAN_LIMIT`; else (`lax.cond`) the level scheme of `gpu_kernels._scores`: for each level
  L = 32, 16, .., 1 the pairs (r, c) in the two halves of one 2L-row block, through the reference row
  m(r) = the last row of the block's first half, e^(-|G_r - G_m(r)|) on both sides (log gates <= 0 make G
  non-increasing, so that is e^(G_r - G_m) for query rows and e^(G_m - G_c) for key rows); the diagonal an
  exact fp32 row dot; the levels in a rolled loop (unrolled, they took ptxas to 255 registers with spills).
  Mosaic has no row gather: G[m(r)] is a one-hot [C, C] matrix (built in registers) times G, as three bf16
  wgmmas whose bf16 parts of G sum to it exactly (8 + 8 + 8 mantissa bits), the one-hot sum adding nothing
  else. `g_parts`: three bf16 [C, K] SMEM tiles free by then (the caller's q and k tiles, whose values are
  in registers, and one of its own).
  """
  c = CHUNK
  r, col = _iotas((c, c))
  span = jnp.max(jnp.max(jnp.abs(diff), axis=1), axis=0)

  def single():
    return jnp.where(r >= col, _score_product(qt_s, kt_s, qf * _exp(diff), kf * _exp(-diff)), 0.0)

  def levels():
    _store_bf16_parts(gate, g_parts)
    diagonal = jnp.where(r == col, jax.lax.broadcast_in_dim(jnp.sum(qf * kf, axis=1), (c, c), (0,)), 0.0)

    def level(lg, out):                       # a rolled loop: one level's temporaries live at a time
      half = jnp.left_shift(jnp.int32(1), lg)
      ref_row = (r // (2 * half)) * (2 * half) + (half - 1)
      g_ref = _select_rows(jnp.where(col == ref_row, 1.0, 0.0).astype(jnp.bfloat16), g_parts, gate.shape)
      e = _exp(-jnp.abs(gate - g_ref))
      pair = ((r // half) % 2 == 1) & ((col // half) % 2 == 0) & (r // (2 * half) == col // (2 * half))
      return jnp.where(pair, _score_product(qt_s, kt_s, qf * e, kf * e), out)

    return jax.lax.fori_loop(0, c.bit_length() - 1, level, diagonal)

  return jax.lax.cond(span <= SPAN_LIMIT, single, levels) if fallback else single()


def out_pass(q: Array, k: Array, v: Array, g: Array, states: Array | TransposedStates, *, scale: float,
             levels_fallback: bool = True) -> Array:
  """o for all chunks: q, k [B, T, H, K] bf16, v [B, T, H, V] bf16, g [B, T, H, K] fp32 (chunk-local
  cumsum), states: [B, T / 64, H, K, V] bf16 (the state entering each chunk, `gpu._states`) or
  `TransposedStates`. Returns [B, T, H, V] bf16. `levels_fallback=False` drops the level scheme (wrong where a
  chunk's decay span exceeds SPAN_LIMIT): only for measuring what the fallback costs."""
  batch, tokens, heads, dim_k = q.shape
  dim_v = v.shape[-1]
  _check("out_pass", v, g, q, k)
  c = CHUNK
  transposed = isinstance(states, TransposedStates)
  state_ops = tuple(states) if transposed else (states,)
  sw_k = _swizzle(dim_k, jnp.bfloat16)       # q e^G and the state: one wgmma's operands
  segments = states.carry.shape[1] if transposed else 1
  per_seg = tokens // c // segments

  def body(q_gmem, k_gmem, v_gmem, g_gmem, *refs):
    h_gmems, (o_gmem, q_s, k_s, g_s, v_s, h_s, qe_s, qt_s, kt_s, o_s, g_mid_s, gp_s, bars), extra = (
        refs[:len(state_ops)], refs[len(state_ops):len(state_ops) + 13], refs[len(state_ops) + 13:])
    b, h, n = jax.lax.axis_index("b"), jax.lax.axis_index("h"), jax.lax.axis_index("n")
    rows = pl.ds(n * c, c)
    plgpu.copy_gmem_to_smem(q_gmem.at[b, rows, h], q_s, bars.at[0])
    plgpu.copy_gmem_to_smem(k_gmem.at[b, rows, h], k_s, bars.at[1])
    plgpu.copy_gmem_to_smem(g_gmem.at[b, rows, h], g_s, bars.at[2])
    plgpu.copy_gmem_to_smem(v_gmem.at[b, rows, h], v_s, bars.at[4])
    plgpu.copy_gmem_to_smem(g_gmem.at[b, n * c + c // 2, h], g_mid_s, bars.at[5])
    if transposed:
      local_s, carry_s, decay_s, extra_bars = extra
      plgpu.copy_gmem_to_smem(h_gmems[0].at[b, n, h], local_s, bars.at[3])
      plgpu.copy_gmem_to_smem(h_gmems[1].at[b, n // per_seg, h], carry_s, extra_bars.at[0])
      plgpu.copy_gmem_to_smem(h_gmems[2].at[b, n, h], decay_s, extra_bars.at[1])
    else:
      plgpu.copy_gmem_to_smem(h_gmems[0].at[b, n, h], h_s, bars.at[3])
    for i in (0, 1, 2, 5):
      plgpu.barrier_wait(bars.at[i])
    gate = g_s[...]
    g_mid = _rows_broadcast(plgpu.load(g_mid_s, layout=ROW_VECTOR), (c, dim_k))
    qf, kf = q_s[...].astype(jnp.float32), k_s[...].astype(jnp.float32)
    qe_s[...] = (qf * _exp(gate)).astype(qe_s.dtype)
    plgpu.barrier_wait(bars.at[3])
    if transposed:                            # h^T = local + decay * carry, joined here (no pass of its own)
      plgpu.barrier_wait(extra_bars.at[0])
      plgpu.barrier_wait(extra_bars.at[1])
      decay = _rows_broadcast(plgpu.load(decay_s, layout=ROW_VECTOR), (dim_v, dim_k))
      h_s[...] = (local_s[...].astype(jnp.float32) + decay * carry_s[...]).astype(h_s.dtype)
    plgpu.commit_smem()
    state = h_s.transpose((1, 0)) if transposed else h_s

    # The scores first: nothing else (q, k, G aside) is live across their lax.cond (ptxas: 255 registers and
    # spills with the inter-chunk accumulator live across it, session 11).
    a16 = _scores(qf, kf, gate, gate - g_mid, qt_s, kt_s, (q_s, k_s, gp_s), levels_fallback
                  ).astype(jnp.bfloat16)
    plgpu.barrier_wait(bars.at[4])

    def inter_and_intra(acc):
      plgpu.wgmma(acc, qe_s, state)
      plgpu.wgmma(acc, a16, v_s)

    o = pl.run_state(inter_and_intra)(plgpu.ACC.init(_zeros((c, dim_v))))
    o_s[...] = (o * scale).astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_gmem.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)

  state_tile = (dim_v, dim_k) if transposed else (dim_k, dim_v)
  scratch = [_smem((c, dim_k), jnp.bfloat16), _smem((c, dim_k), jnp.bfloat16),
             _smem((c, dim_k), jnp.float32), _smem((c, dim_v), jnp.bfloat16),
             _smem(state_tile, jnp.bfloat16, sw_k), _smem((c, dim_k), jnp.bfloat16, sw_k),
             _smem((c, dim_k), jnp.float32), _smem((c, dim_k), jnp.float32),
             _smem((c, dim_v), jnp.bfloat16), plgpu.SMEM((dim_k,), jnp.float32),
             _smem((c, dim_k), jnp.bfloat16, sw_k), plgpu.Barrier(num_barriers=6)]
  if transposed:
    scratch += [_smem(state_tile, jnp.bfloat16, sw_k), _smem(state_tile, jnp.float32),
                plgpu.SMEM((dim_k,), jnp.float32), plgpu.Barrier(num_barriers=2)]
  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((batch, tokens, heads, dim_v), jnp.bfloat16),
      grid=(batch, heads, tokens // c), grid_names=("b", "h", "n"), scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(approx_math=True))(q, k, v, g, *state_ops)


def forward(q: Array, k: Array, v: Array, g: Array, *, scale: float, segments: int = 1,
            levels_fallback: bool = True, raw_gate: bool = False) -> Array:
  """The GLA forward: the state pass then `out_pass`, o [B, T, H, V] bf16. g: G (the chunk-local cumsum of
  the log gate), or with `raw_gate` the chunk-padded log gate itself, whose G the state pass forms and writes
  for the output pass (`state_pass_from_log_gate`: no cumsum pass before the kernels)."""
  if raw_gate:
    states, g = state_pass_from_log_gate(k, v, g, segments)
  else:
    states = state_pass(k, v, g, segments)
  return out_pass(q, k, v, g, states, scale=scale, levels_fallback=levels_fallback)
