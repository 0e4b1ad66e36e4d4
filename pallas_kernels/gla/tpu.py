"""Fused chunked GLA forward and backward for TPU (Mosaic TPU Pallas), attached with `jax.custom_vjp`.

Semantics are those of `reference.chunked_gla` (fla's `naive_recurrent_gla`): per head, S_t = diag(exp(g_t))
S_{t-1} + k_t^T v_t and o_t = scale * q_t S_t, zero initial state, fp32 state, output in v's dtype. The
kernels implement equations F1-F3 and B1-B6 of `shared/reference/gla_kernels.md` §1.5 literally.

Layout. [B, T, H, D] is reshaped (free) to [B, T, H*D]. T is zero-padded to a multiple of the chunk C; zero
q/k/v and a zero log gate leave the real outputs unchanged. XLA computes the chunk-local cumulative log gate G
in fp32 with `jnp.cumsum` on a [B, NT, C, H, K] view, because Mosaic TPU has no cumsum lowering. The kernels
therefore take G and return dG (B6, chunk-boundary term δ_n included). JAX's VJP of the cumsum is the in-chunk
reverse cumsum (B7).

Head packing. A TPU block's last two dims must be divisible by (8, 128) or equal the array's. DiG's heads are
K=32 / V=64, so P heads sit side by side in the lane axis: blocks are [C, P*K] for q, k, G and [C, P*V] for v,
o.
- P is the smallest head count that makes both lane widths multiples of 128: 32/64 -> P=4 (128/256 lanes),
  64/64 -> P=2, 128/128 -> P=1. Head dims needing more than 256/512 lanes are not supported.
- If H is not a multiple of P, zero heads are padded in (DiG-S H=6 -> 8, DiG-XL H=18 -> 20), so every
  in-kernel lane dim is a multiple of 128. A single block spanning odd full dims (6 heads = 192 lanes) would
  also be a legal BlockSpec, but would give Mosaic 192-lane matmuls and reshapes, which could not be checked
  here.
- The state of a head group is one block-diagonal [P*V, P*K] fp32 matrix. It is stored transposed (V first),
  so each per-key-channel decay is a lane broadcast and no in-kernel transpose is needed. Cross-head products
  are removed with a block-diagonal mask. The MXU contracts 128 deep anyway, so for K=32 this wastes nothing
  that per-head 32-deep matmuls would not also waste.
- Intra-chunk scores of all P heads come from one matmul against a head-stacked key matrix [P*C, P*K], where
  copy p keeps only head p's lanes.

Grids. Forward: (B, head groups, NT) with semantics (parallel, parallel, arbitrary). The state lives in a
`pltpu.VMEM` scratch zeroed under `pl.when(program_id(2) == 0)`. The same kernel body, switched by flags,
writes either o (forward pass) or the state entering every chunk, h_n, as [B, groups, NT, P*V, P*K] fp32
(backward pass). Backward: the custom VJP saves only (q, k, v, G) and re-runs the state pass. That pass writes
h_n once and the reverse kernel reads it once: 4*P*K*V/C bytes per token-head (256 B for DiG at C=128), P
times a per-head state because the zero off-diagonal blocks are stored too. For DiG's short sequences this is
cheaper than keeping h alive from the forward pass. Then one reverse-order kernel (chunk index_map n ->
NT-1-n) carries D_n = dL/dh_{n+1} in a VMEM scratch and computes dq, dk, dv and dG of each chunk (B1-B6).
There are no V tiles: a packed state is at most 512 x 256 fp32.

Numerics. No exponent is ever positive, for any gate. Exponents are also clamped at 0, so even an invalid
positive log gate cannot overflow.
- Inter-chunk terms use exp(G) and exp(G_C - G).
- Intra-chunk scores use sub-chunks of c=16 rows. Query sub-chunk a is paired with all earlier keys through a
  reference row, G at the first row of a (fla's scheme): Q exp(G - G_ref) and K exp(G_ref - G) are both <=
  |q|, |k|, so bf16 operands are safe. Keys from sub-chunk a on get a factor of exactly 0, masked before the
  exp.
- The 16 x 16 diagonal blocks use the exact pairwise decay exp(G_r - G_j), masked to r >= j before the exp.
  They are reduced per head by an fp32 HIGHEST matmul with a 0/1 block-diagonal matrix.
- Matmul operands: bf16 with fp32 accumulation for bf16 inputs. The intra-chunk factors are bounded; the state
  h and its gradient D are rounded to bf16 for the inter-chunk products, as fla does. fp32 inputs use fp32
  operands with precision=HIGHEST. Elementwise math, exps, the state and all accumulators are fp32.
- Matmul shapes are (16, 128)-aligned: [16, P*K] x [P*C, P*K]^T, [256, 128] x [128, 256], and so on. The
  exception is P=1 with C=64, where the stripe scores are [16, 64]; C=128 (the default) avoids it.

Verified without a TPU (tests/pallas_kernels/gla/test_tpu_kernel.py):
- interpret mode on CPU against `reference.chunked_gla`, including the TPU simulator with 2 cores and race
  detection;
- the (8, 128) rule on every BlockSpec;
- that forward and backward lower to Mosaic MLIR for TPU (`jax.export` with an abstract TPU device runs the
  Pallas -> Mosaic lowering on the CPU).

NOT verified without a TPU:
- Mosaic's own compilation (layout inference and relayouts), in particular the 3-D [16, 16, lanes]
  diagonal-block values (16x128 -> 16x1x128 shape casts, sublane broadcasts, reductions over the two leading
  axes) and the transposed-lhs bf16 matmuls;
- MXU bf16 rounding versus interpret mode's exact arithmetic;
- VMEM fit under the default scoped limit (intermediates up to [512, 256] fp32);
- any performance number. Sub-chunk size, chunk size and the P-fold block-diagonal waste are untuned guesses.

Deviations from fla:
- natural-log domain, no exp2;
- head packing instead of one program per head;
- every off-diagonal sub-block is handled in-kernel with reference rows, instead of in separate kernels;
- no initial or final state (DiG never uses it).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gla import reference

Array = jax.Array

LANES = 128
SUB_CHUNK = 16
DEFAULT_CHUNK_SIZE = 128  # TPU's preferred, lane-aligned chunk.
MAX_PACKED_K = 256
MAX_PACKED_V = 512
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static plan of one call (hashable: it is the custom_vjp's non-differentiable argument)."""
  batch: int
  tokens: int  # padded to a multiple of `chunk`
  heads: int  # padded to a multiple of `heads_per_block`
  dk: int
  dv: int
  heads_per_block: int
  chunk: int
  sub_chunk: int
  scale: float
  bf16_matmuls: bool
  interpret: Any = False

  @property
  def pk(self) -> int:
    return self.heads_per_block * self.dk

  @property
  def pv(self) -> int:
    return self.heads_per_block * self.dv

  @property
  def num_groups(self) -> int:
    return self.heads // self.heads_per_block

  @property
  def num_chunks(self) -> int:
    return self.tokens // self.chunk

  @property
  def num_sub(self) -> int:
    return self.chunk // self.sub_chunk


def _heads_per_block(heads: int, dk: int, dv: int) -> tuple[int, int]:
  """Returns (heads per block P, head count padded to a multiple of P); P*K and P*V are multiples of 128."""
  p = 1
  while (p * dk) % LANES or (p * dv) % LANES:
    p += 1
  if p * dk > MAX_PACKED_K or p * dv > MAX_PACKED_V:
    raise ValueError(f"head dims K={dk}, V={dv} need {p} heads per 128-lane block, i.e. more than "
                     f"{MAX_PACKED_K}/{MAX_PACKED_V} lanes; use the chunked reference instead")
  return p, -(-heads // p) * p


def _plan(q_shape, v_shape, dtype, chunk_size: int | None, scale: float | None, interpret: Any) -> _Layout:
  if len(q_shape) != 4 or len(v_shape) != 4 or tuple(v_shape[:3]) != tuple(q_shape[:3]):
    raise ValueError(f"expected q [B,T,H,K] and v [B,T,H,V] with equal B, T, H; got q{q_shape} v{v_shape}")
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"TPU GLA kernel supports float32 and bfloat16 inputs; got {jnp.dtype(dtype)}")
  b, t, h, dk = q_shape
  dv = v_shape[-1]
  chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
  if chunk not in (64, 128):
    raise ValueError(f"chunk_size must be 64 or 128 (128 recommended on TPU); got {chunk}")
  p, padded_heads = _heads_per_block(h, dk, dv)
  return _Layout(batch=b, tokens=-(-t // chunk) * chunk, heads=padded_heads, dk=dk, dv=dv, heads_per_block=p,
                 chunk=chunk, sub_chunk=SUB_CHUNK, scale=float(dk ** -0.5 if scale is None else scale),
                 bf16_matmuls=jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16), interpret=interpret)


def is_supported(q_shape, v_shape, dtype) -> bool:
  """True for [B,T,H,K] / [B,T,H,V] fp32/bf16 shapes whose heads pack into legal TPU blocks."""
  try:
    _plan(tuple(q_shape), tuple(v_shape), dtype, None, None, False)
  except ValueError:
    return False
  return True


# ----------------------------------------------------------------------------------------------------------
# In-kernel helpers (values are fp32 unless stated).


def _dot(a: Array, b: Array, dims, lay: _Layout, exact: bool = False) -> Array:
  """MXU matmul: bf16 operands + fp32 accumulation for bf16 inputs, fp32 HIGHEST otherwise or when `exact`."""
  if lay.bf16_matmuls and not exact:
    return lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims,
                           preferred_element_type=jnp.float32)
  return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims,
                         precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _head_mask(shape: tuple[int, ...], axis: int, head: int, head_dim: int) -> Array:
  """Bool mask of `shape`: index along `axis` is in packed head `head` (full-shape iota: no i1 broadcasts)."""
  index = lax.broadcasted_iota(jnp.int32, shape, axis)
  return (index >= head * head_dim) & (index < (head + 1) * head_dim)


def _block_diagonal(shape: tuple[int, int], row_dim: int, col_dim: int, heads: int) -> Array:
  """[rows, cols] bool mask: row and column belong to the same packed head."""
  mask = _head_mask(shape, 0, 0, row_dim) & _head_mask(shape, 1, 0, col_dim)
  for p in range(1, heads):
    mask = mask | (_head_mask(shape, 0, p, row_dim) & _head_mask(shape, 1, p, col_dim))
  return mask


def _stack_heads(x: Array, head_dim: int, heads: int) -> Array:
  """[n, lanes] -> [P*n, lanes]: copy p keeps only head p's lanes, so one matmul gives every head's scores."""
  if heads == 1:
    return x
  copies = [jnp.where(_head_mask(x.shape, 1, p, head_dim), x, 0.0) for p in range(heads)]
  return jnp.concatenate(copies, axis=0)


def _unstack_heads(x: Array, head_dim: int, heads: int) -> Array:
  """[P*n, lanes] -> [n, lanes]: sum over p of copy p restricted to head p's lanes (adjoint of stacking)."""
  if heads == 1:
    return x
  n = x.shape[0] // heads
  out = jnp.zeros((n, x.shape[1]), jnp.float32)
  for p in range(heads):
    out = out + jnp.where(_head_mask((n, x.shape[1]), 1, p, head_dim), x[p * n:(p + 1) * n], 0.0)
  return out


def _diagonal_decay(g: Array) -> Array:
  """[c, c, lanes]: exp(g_r - g_j) for r >= j, else 0 (masked before the exp, so exponents are <= 0)."""
  row = lax.broadcasted_iota(jnp.int32, g.shape, 0)  # 2-D iota, broadcast like the data (no 3-D iota).
  diff = jnp.minimum(g[:, None, :] - g[None, :, :], 0.0)
  return jnp.exp(jnp.where(row[:, None, :] >= row[None, :, :], diff, -jnp.inf))


def _per_head_sum(x: Array, row_dim: int, col_dim: int, cols: int, lay: _Layout) -> Array:
  """[c, c, Lin] -> [c, c, cols]: sums each head's input lanes, spread over its output lanes (exact fp32)."""
  c, _, lanes_in = x.shape
  ones = jnp.where(_block_diagonal((lanes_in, cols), row_dim, col_dim, lay.heads_per_block), 1.0, 0.0)
  return _dot(x.reshape(c * c, lanes_in), ones, _NN, lay, exact=True).reshape(c, c, cols)


def _stripe_factors(g_rows: Array, g: Array, first_row: int) -> tuple[Array, Array]:
  """Reference-row factors of query rows [first_row, first_row + c) against keys [0, first_row).

  The reference is G at `first_row`: exp(G_r - G_ref) for the query rows and exp(G_ref - G_j) for the earlier
  keys, both exponents <= 0; keys at or after `first_row` get a factor of exactly 0 (masked before the exp).
  """
  g_ref = g_rows[:1]
  q_factor = jnp.exp(jnp.minimum(g_rows - g_ref, 0.0))
  key_row = lax.broadcasted_iota(jnp.int32, g.shape, 0)
  k_factor = jnp.exp(jnp.where(key_row < first_row, jnp.minimum(g_ref - g, 0.0), -jnp.inf))
  return q_factor, k_factor


def _intra_forward(q, k, v, g, lay: _Layout) -> Array:
  """Unscaled intra-chunk output sum_{j<=r} Â[r,j] v_j of a [C, lanes] chunk, per packed head.

  Query sub-chunk a: its c x c diagonal block with the exact decay, plus one stripe against all C keys of the
  chunk (keys from sub-chunk a on are zeroed by their factor), so every matmul has C or P*C columns.
  """
  c, hp = lay.sub_chunk, lay.heads_per_block
  v_stack = _stack_heads(v, lay.dv, hp)
  pieces = []
  for a in range(lay.num_sub):
    rows = slice(a * c, (a + 1) * c)
    qa, ka, va, ga = q[rows], k[rows], v[rows], g[rows]
    scores = _per_head_sum(qa[:, None, :] * ka[None, :, :] * _diagonal_decay(ga), lay.dk, lay.dv, lay.pv, lay)
    out = jnp.sum(scores * va[None, :, :], axis=1)
    if a:
      q_factor, k_factor = _stripe_factors(ga, g, a * c)
      k_stack = _stack_heads(k * k_factor, lay.dk, hp)
      out = out + _dot(_dot(qa * q_factor, k_stack, _NT, lay), v_stack, _NN, lay)
    pieces.append(out)
  return jnp.concatenate(pieces, axis=0)


def _intra_backward(q, k, v, g, do, lay: _Layout) -> tuple[Array, Array, Array]:
  """Intra-chunk parts of dq, dk, dv (B2-B5 restricted to the causal mask), scale included."""
  c, hp, s = lay.sub_chunk, lay.heads_per_block, lay.scale
  v_stack = _stack_heads(v, lay.dv, hp)
  dq_parts, dk_parts, dv_parts = [], [], []
  dk_stripes = jnp.zeros_like(k)
  dv_stripes = jnp.zeros_like(v)
  for a in range(lay.num_sub):
    rows = slice(a * c, (a + 1) * c)
    qa, ka, va, ga, doa = q[rows], k[rows], v[rows], g[rows], do[rows]
    decay = _diagonal_decay(ga)
    # dÂ[r, j] of each head, spread over that head's K lanes, times the exact decay.
    d_scores = s * _per_head_sum(doa[:, None, :] * va[None, :, :], lay.dv, lay.dk, lay.pk, lay) * decay
    dq_a = jnp.sum(d_scores * ka[None, :, :], axis=1)
    dk_parts.append(jnp.sum(d_scores * qa[:, None, :], axis=0))
    scores = s * _per_head_sum(qa[:, None, :] * ka[None, :, :] * decay, lay.dk, lay.dv, lay.pv, lay)
    dv_parts.append(jnp.sum(scores * doa[:, None, :], axis=0))
    if a:
      q_factor, k_factor = _stripe_factors(ga, g, a * c)
      q_t = qa * q_factor
      k_stack = _stack_heads(k * k_factor, lay.dk, hp)
      scores = s * _dot(q_t, k_stack, _NT, lay)  # [c, P*C]; head p in columns p*C ... (p+1)*C - 1.
      d_scores = s * _dot(doa, v_stack, _NT, lay)
      dq_a = dq_a + _dot(d_scores, k_stack, _NN, lay) * q_factor
      dk_stripes = dk_stripes + _unstack_heads(_dot(d_scores, q_t, _TN, lay), lay.dk, hp) * k_factor
      dv_stripes = dv_stripes + _unstack_heads(_dot(scores, doa, _TN, lay), lay.dv, hp)
    dq_parts.append(dq_a)
  return (jnp.concatenate(dq_parts, axis=0), jnp.concatenate(dk_parts, axis=0) + dk_stripes,
          jnp.concatenate(dv_parts, axis=0) + dv_stripes)


# ----------------------------------------------------------------------------------------------------------
# Kernels.


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, *refs, lay: _Layout, emit_output: bool, emit_states: bool):
  """One chunk of one head group: o (F2, F3) and/or the entering state h_n, then the state update (F1)."""
  refs = list(refs)
  o_ref = refs.pop(0) if emit_output else None
  h_ref = refs.pop(0) if emit_states else None
  (state_ref,) = refs  # S^T, [P*V, P*K] fp32, block-diagonal.

  @pl.when(pl.program_id(2) == 0)
  def _init():
    state_ref[...] = jnp.zeros_like(state_ref)

  q, k, v, g = (r[...].astype(jnp.float32) for r in (q_ref, k_ref, v_ref, g_ref))
  state = state_ref[...]
  if emit_states:
    h_ref[...] = state
  gamma = g[-1:, :]
  if emit_output:
    o = _dot(q * jnp.exp(g), state, _NT, lay) + _intra_forward(q, k, v, g, lay)
    o_ref[...] = (o * lay.scale).astype(o_ref.dtype)
  update = _dot(v, k * jnp.exp(gamma - g), _TN, lay)
  vk_diag = _block_diagonal((lay.pv, lay.pk), lay.dv, lay.dk, lay.heads_per_block)
  state_ref[...] = state * jnp.exp(gamma) + jnp.where(vk_diag, update, 0.0)


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, h_ref, dq_ref, dk_ref, dv_ref, dg_ref, dstate_ref, *,
                     lay: _Layout):
  """One chunk, visited last to first: B2-B6 for the chunk, then D_{n-1} from D_n (B1)."""

  @pl.when(pl.program_id(2) == 0)
  def _init():
    dstate_ref[...] = jnp.zeros_like(dstate_ref)

  q, k, v, g, do = (r[...].astype(jnp.float32) for r in (q_ref, k_ref, v_ref, g_ref, do_ref))
  h = h_ref[...]  # h_n^T, state entering the chunk.
  d_next = dstate_ref[...]  # D_n^T = (dL/dh_{n+1})^T.
  s = lay.scale
  gamma = g[-1:, :]
  exp_g = jnp.exp(g)
  exp_tail = jnp.exp(gamma - g)
  dq_intra, dk_intra, dv_intra = _intra_backward(q, k, v, g, do, lay)
  dq = s * _dot(do, h, _NN, lay) * exp_g + dq_intra
  dk_inter = _dot(v, d_next, _NN, lay) * exp_tail
  dk = dk_inter + dk_intra
  dv = _dot(k * exp_tail, d_next, _NT, lay) + dv_intra
  delta = (jnp.exp(gamma) * jnp.sum(h * d_next, axis=0, keepdims=True)
           + jnp.sum(k * dk_inter, axis=0, keepdims=True))
  last_row = lax.broadcasted_iota(jnp.int32, g.shape, 0) == lay.chunk - 1
  dg = q * dq - k * dk + jnp.where(last_row, delta, 0.0)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dg_ref[...] = dg
  vk_diag = _block_diagonal((lay.pv, lay.pk), lay.dv, lay.dk, lay.heads_per_block)
  dstate_ref[...] = d_next * jnp.exp(gamma) + jnp.where(vk_diag, s * _dot(do, q * exp_g, _TN, lay), 0.0)


# ----------------------------------------------------------------------------------------------------------
# pallas_call builders. Arrays are [B, T, H*D] (chunk blocks) and [B, groups, NT, P*V, P*K] (states).


def _chunk_spec(lay: _Layout, lanes: int, reverse: bool) -> pl.BlockSpec:
  last = lay.num_chunks - 1
  if reverse:
    return pl.BlockSpec((None, lay.chunk, lanes), lambda b, grp, n: (b, last - n, grp))
  return pl.BlockSpec((None, lay.chunk, lanes), lambda b, grp, n: (b, n, grp))


def _state_spec(lay: _Layout, reverse: bool) -> pl.BlockSpec:
  last = lay.num_chunks - 1
  if reverse:
    return pl.BlockSpec((None, None, None, lay.pv, lay.pk), lambda b, grp, n: (b, grp, last - n, 0, 0))
  return pl.BlockSpec((None, None, None, lay.pv, lay.pk), lambda b, grp, n: (b, grp, n, 0, 0))


def _shapes(lay: _Layout) -> dict[str, tuple[int, ...]]:
  t, hk, hv = lay.tokens, lay.heads * lay.dk, lay.heads * lay.dv
  return {"qkg": (lay.batch, t, hk), "v": (lay.batch, t, hv),
          "states": (lay.batch, lay.num_groups, lay.num_chunks, lay.pv, lay.pk)}


def _forward_specs(lay: _Layout, emit_output: bool, emit_states: bool):
  qkg, vo = _chunk_spec(lay, lay.pk, False), _chunk_spec(lay, lay.pv, False)
  shapes = _shapes(lay)
  in_specs = [("q", qkg, shapes["qkg"]), ("k", qkg, shapes["qkg"]), ("v", vo, shapes["v"]),
              ("G", qkg, shapes["qkg"])]
  out_specs = []
  if emit_output:
    out_specs.append(("o", vo, shapes["v"]))
  if emit_states:
    out_specs.append(("states", _state_spec(lay, False), shapes["states"]))
  return in_specs, out_specs


def _backward_specs(lay: _Layout):
  qkg, vo = _chunk_spec(lay, lay.pk, True), _chunk_spec(lay, lay.pv, True)
  shapes = _shapes(lay)
  in_specs = [("q", qkg, shapes["qkg"]), ("k", qkg, shapes["qkg"]), ("v", vo, shapes["v"]),
              ("G", qkg, shapes["qkg"]), ("do", vo, shapes["v"]),
              ("states", _state_spec(lay, True), shapes["states"])]
  out_specs = [("dq", qkg, shapes["qkg"]), ("dk", qkg, shapes["qkg"]), ("dv", vo, shapes["v"]),
               ("dG", qkg, shapes["qkg"])]
  return in_specs, out_specs


def _call(kernel, lay: _Layout, in_specs, out_specs, out_dtypes, name: str):
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(lay.batch, lay.num_groups, lay.num_chunks),
          in_specs=[spec for _, spec, _ in in_specs],
          out_specs=[spec for _, spec, _ in out_specs],
          scratch_shapes=[pltpu.VMEM((lay.pv, lay.pk), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(shape, dt) for (_, _, shape), dt in zip(out_specs, out_dtypes)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=lay.interpret,
      name=name)


def _forward_call(lay: _Layout, q, k, v, g, *, emit_output: bool, emit_states: bool) -> list[Array]:
  in_specs, out_specs = _forward_specs(lay, emit_output, emit_states)
  dtypes = ([v.dtype] if emit_output else []) + ([jnp.float32] if emit_states else [])
  kernel = functools.partial(_forward_kernel, lay=lay, emit_output=emit_output, emit_states=emit_states)
  name = "gla_tpu_fwd" if emit_output else "gla_tpu_states"
  return _call(kernel, lay, in_specs, out_specs, dtypes, name)(q, k, v, g)


def _backward_call(lay: _Layout, q, k, v, g, do, states) -> list[Array]:
  in_specs, out_specs = _backward_specs(lay)
  kernel = functools.partial(_backward_kernel, lay=lay)
  dtypes = [q.dtype, k.dtype, v.dtype, jnp.float32]
  return _call(kernel, lay, in_specs, out_specs, dtypes, "gla_tpu_bwd")(q, k, v, g, do, states)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gla_packed(lay: _Layout, q: Array, k: Array, v: Array, g: Array) -> Array:
  return _forward_call(lay, q, k, v, g, emit_output=True, emit_states=False)[0]


def _gla_packed_fwd(lay, q, k, v, g):
  return _gla_packed(lay, q, k, v, g), (q, k, v, g)


def _gla_packed_bwd(lay, residuals, do):
  q, k, v, g = residuals
  (states,) = _forward_call(lay, q, k, v, g, emit_output=False, emit_states=True)
  dq, dk, dv, dg = _backward_call(lay, q, k, v, g, do.astype(v.dtype), states)
  return dq, dk, dv, dg


_gla_packed.defvjp(_gla_packed_fwd, _gla_packed_bwd)


# ----------------------------------------------------------------------------------------------------------
# Public API.


def block_shapes(q_shape, v_shape, dtype=jnp.float32, chunk_size: int | None = None
                 ) -> list[tuple[str, tuple, tuple[int, ...]]]:
  """(operand, block_shape, array_shape) of every BlockSpec the kernels build for these shapes (for tests)."""
  lay = _plan(tuple(q_shape), tuple(v_shape), dtype, chunk_size, None, False)
  out = []
  for call, (ins, outs) in (("fwd", _forward_specs(lay, True, True)), ("bwd", _backward_specs(lay))):
    out += [(f"{call}.{name}", tuple(spec.block_shape), shape) for name, spec, shape in ins + outs]
  return out


def gla(q: Array, k: Array, v: Array, log_gate: Array, *, chunk_size: int | None = None,
        scale: float | None = None, interpret: Any = None) -> Array:
  """Causal GLA on TPU. q, k, log_gate [B,T,H,K]; v [B,T,H,V]; returns o [B,T,H,V] in v's dtype.

  Differentiable in q, k, v and log_gate (custom VJP). `interpret`: False runs the Mosaic kernels (TPU only);
  True or a `pltpu.InterpretParams` runs the kernel bodies in interpret mode (any backend); None (the default)
  means False on TPU and True elsewhere.
  """
  if q.shape != k.shape or q.shape != log_gate.shape:
    raise ValueError(f"q, k and log_gate must have one shape; got {q.shape}, {k.shape}, {log_gate.shape}")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  dtype = jnp.promote_types(q.dtype, v.dtype)
  lay = _plan(q.shape, v.shape, dtype, chunk_size, scale, interpret)
  b, t, h, _ = q.shape
  out_dtype = v.dtype
  pad_heads = ((0, 0), (0, 0), (0, lay.heads - h), (0, 0))
  q, k, v = (jnp.pad(reference.pad_to_chunks(x.astype(dtype), lay.chunk), pad_heads) for x in (q, k, v))
  g = jnp.pad(reference.pad_to_chunks(log_gate.astype(jnp.float32), lay.chunk), pad_heads)
  g = reference.chunk_local_cumsum(g, lay.chunk)
  packed = [x.reshape(b, lay.tokens, -1) for x in (q, k, v, g)]
  o = _gla_packed(lay, *packed)
  return o.reshape(b, lay.tokens, lay.heads, lay.dv)[:, :t, :h].astype(out_dtype)
