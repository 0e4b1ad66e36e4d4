"""Gated linear attention (GLA) for NVIDIA GPUs: Pallas kernels (Triton lowering) with a `jax.custom_vjp`.

Math and notation: `shared/reference/gla_kernels.md` §1.5 (equations F1-F3, B1-B7). Per (batch, head) the
tokens are split into chunks of C; G is the chunk-local inclusive cumsum of the log gate (fp32). XLA owns the
cumsum and its transpose (the reverse cumsum), so the GLA kernels take G and return dG (B6); none of them
needs a cumsum. From 4096 tokens up XLA forms it as a batched fp32 GEMM with a triangular ones matrix
(`KernelConfig.gate_cumsum`, measured in NOTES.md session 6). `gla_low_rank_gate` takes DiG's low-rank gate
unformed instead (`gate.LowRankGate`): `gpu_gate.py`'s kernels then form G, cumsum included, and take its
gradient; the GLA kernels are the same.

This module builds the `pl.pallas_call`s (grids, BlockSpecs, `pallas.triton.CompilerParams`), picks the tiling
per shape (`tuned_config`), attaches the backward with `jax.custom_vjp` and exposes `gla`. The kernel bodies,
their numerics and `KernelConfig` are in `gpu_kernels.py`. Forward: two passes (sequential state pass, then
chunk-parallel outputs), or one fused sequential kernel for short sequences of few (batch, head) pairs.
Backward: a reverse state pass, then chunk-parallel dv and dq/dk/dG kernels. With few (batch, head) pairs and
many chunks both state passes run as parallel segments from zero states; `_join_segments` (XLA) forms the
state each segment receives from the ones before (after) it (`KernelConfig.state_segments`, session 7), and
the kernels that read the states add it as they load them (`SegmentedStates`, session 8).

A forward without a gradient (sampling, evaluation) of a supported shape (bf16, chunk 64, K 32/64, V 64) from
MOSAIC_FORWARD_MIN_TOKENS tokens runs `gpu_mosaic`'s Mosaic GPU kernels instead
(`KernelConfig.forward_backend`; session 11: that forward 1.4x faster at B8 T12544); the VJP's forward saves
the Triton states for the backward. There `gla` skips XLA's cumsum: the Mosaic state pass forms G from the
log gate and writes it for the output pass (`gla_chunked_log_gate`, session 12).

`interpret=True` runs the same kernel bodies through Pallas' interpreter (CPU tests); Triton's rules
(power-of-two blocks, dot dims >= 16) still shape the code even where the interpreter would not enforce them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gla import gpu_gate, gpu_kernels, gpu_mosaic, reference, segment_join
from pallas_kernels.gla.gate import LowRankGate
from pallas_kernels.gla.gpu_kernels import FORWARD_BACKENDS, INTRA_MODES, KernelConfig

Array = jax.Array
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
MIN_DIM, MAX_DIM = 16, 128
FUSED_MAX_SEQUENCES = 96  # tuned_config: the fused forward only below this many (batch x head) sequences
GEMM_CUMSUM_MIN_TOKENS = 4096  # tuned_config: the gate cumsum as a GEMM from this many tokens up
# tuned_config, long sequences (session 8): from this many chunks, with K, V <= 64, the state passes take the
# whole K x V state per program and run in enough segments for about STATE_TARGET_PROGRAMS programs.
WHOLE_STATE_MIN_CHUNKS = 128
STATE_TARGET_PROGRAMS = 192
# tuned_config: a forward without a gradient runs the Mosaic GPU kernels (`gpu_mosaic`) from this many tokens
# up where they support the shape (session 11, H100: 1.1-1.4x faster at 4096-50176 tokens; mixed at 1024-2048,
# slower at 256).
MOSAIC_FORWARD_MIN_TOKENS = 4096


def _is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def is_supported(q_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype) -> bool:
  """True where the kernels lower and pay off: bf16/fp32, head dims powers of two in [16, 128].

  fp32 at 128/128 needs the K-tiled chunk-parallel kernels that `tuned_config` picks for it (session 3: with
  whole-K tiles the 128/128 fp32 GPU test did not finish within 240 s; session 5: with K tiles of 32 it
  passes on an H100). An explicit `config` with whole-K tiles there is the caller's choice. `impl="auto"`
  still prefers the XLA reference for fp32 wider than 64 (`auto_worthwhile`).
  """
  if len(q_shape) != 4 or len(v_shape) != 4 or tuple(q_shape[:3]) != tuple(v_shape[:3]):
    return False
  dk, dv = q_shape[-1], v_shape[-1]
  dims_ok = all(_is_pow2(d) and MIN_DIM <= d <= MAX_DIM for d in (dk, dv))
  return dims_ok and q_shape[1] >= 1 and jnp.dtype(dtype) in SUPPORTED_DTYPES


AUTO_MAX_DIM_FP32 = 64  # auto_worthwhile: fp32 heads wider than this only when asked for by name


def auto_worthwhile(q_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype) -> bool:
  """Whether `impl="auto"` should take this kernel for a supported shape (see ops.resolve_impl).

  fp32 inputs with head dims above AUTO_MAX_DIM_FP32 run correctly (H100 tests, session 5) but compile slowly
  (a B2 T2048 H4 128/128 timing reported nothing within 140 s) and their speed against the XLA reference is
  unmeasured, so `auto` keeps the reference there; impl="pallas_gpu" takes the kernel.
  """
  return jnp.dtype(dtype) != jnp.float32 or max(q_shape[-1], v_shape[-1]) <= AUTO_MAX_DIM_FP32


def tuned_config(q_shape: tuple[int, ...], v_shape: tuple[int, ...],
                 chunk: int | None = None, dtype=jnp.bfloat16) -> KernelConfig:
  """Tiling picked from per-kernel timings on H100/H200 (see NOTES.md).

  Two-pass forward with prefetching state loops; 16-row K tiles in the state loops when (32, 32) tiles would
  give fewer than 64 programs (long sequences at small batch); the fused forward only for <= 4 chunks and
  fewer than FUSED_MAX_SEQUENCES (batch x heads) sequences, where one launch beats two, and only for head
  dims <= 64 (a precaution, not a measurement: it keeps a whole fp32 K x V state and C x K operands in
  registers, the pattern that did not compile for fp32 at 128). At DiG-S/2's 256 px step (B=32,
  H=6, T=256) the fused forward, which also writes the states for the backward from its sequential loop,
  made forward+backward 0.196 ms against 0.138 ms two-pass (H100, NOTES.md). K tiles of the chunk-parallel
  kernels (session 5, H100, NOTES.md): the dq/dk/dG kernel runs over K tiles of 32 from K = 64 up
  (`grad_block_k`; 64/64 fwd+bwd 3.70 -> 3.11 ms at B8 T12544); the output and dv kernels contract K whole
  except for fp32 inputs wider than 64 (`score_block_k` 32: whole-K fp32 at 128 did not compile in 240 s),
  as tiling them was slower at 64/64 (3.70 -> 4.12 ms). The gate's chunk-local cumsum is a batched GEMM from
  GEMM_CUMSUM_MIN_TOKENS tokens up (session 6, H100: the op 4-22 % faster at T >= 4096 in two runs), the
  `jnp.cumsum` scan below (at DiG-S/2's 256 px step the GEMM made the op faster alone but the model's training
  step 2 % and its forward 5 % slower in a repeated run, where XLA fuses the scan into the gate's math).
  The state passes run in up to 8 parallel segments where they would have fewer than 64 programs and at
  least 64 chunks (session 7, H100: B2 T50176 32/64 fwd 0.99 -> 0.59 ms, fwd+bwd 2.20 -> 1.51; at B8 T12544,
  96 programs, segments gained nothing, and at 4 chunks they cost 15 %). From WHOLE_STATE_MIN_CHUNKS chunks
  with head dims <= 64 each state-pass program takes the whole K x V state (k and G are then read once, not
  once per V tile) and the passes run in up to 16 segments, as many as bring the programs to about
  STATE_TARGET_PROGRAMS (session 8, H100, NOTES.md). Forwards without a gradient take the Mosaic GPU kernels
  where `gpu_mosaic.supported` and from MOSAIC_FORWARD_MIN_TOKENS tokens (session 11).
  """
  b, tokens, heads, dim_k = q_shape
  chunk = chunk or default_chunk_size(tokens)
  programs = b * heads * max(1, dim_k // 32) * max(1, v_shape[-1] // 32)
  num_chunks = -(-tokens // chunk)
  fused = num_chunks <= 4 and b * heads < FUSED_MAX_SEQUENCES and max(dim_k, v_shape[-1]) <= 64
  fp32_wide = jnp.dtype(dtype) == jnp.float32 and dim_k > 64
  few_programs = programs < 64
  if num_chunks >= WHOLE_STATE_MIN_CHUNKS and max(dim_k, v_shape[-1]) <= 64:
    state = dict(state_block_k=dim_k, state_block_v=v_shape[-1],
                 state_segments=min(16, -(-STATE_TARGET_PROGRAMS // (b * heads))))
  else:
    state = dict(state_block_k=16 if few_programs else 32, state_block_v=32,
                 state_segments=8 if few_programs and num_chunks >= 64 else 1)
  padded = (b, num_chunks * chunk, heads, dim_k)    # what the kernels see (`_prepare` pads to whole chunks)
  mosaic = tokens >= MOSAIC_FORWARD_MIN_TOKENS and gpu_mosaic.supported(padded, v_shape, dtype, chunk)
  return KernelConfig(chunk_size=chunk, fused=fused, **state, score_block_k=32 if fp32_wide else dim_k,
                      grad_block_k=32 if dim_k >= 64 else dim_k,
                      gate_cumsum="matmul" if tokens >= GEMM_CUMSUM_MIN_TOKENS else "scan",
                      forward_backend="mosaic" if mosaic else "triton")


def _check_config(config: KernelConfig) -> None:
  if config.fp32_dots not in ("ieee", "tf32"):
    raise ValueError(f"KernelConfig.fp32_dots must be 'ieee' or 'tf32'; got {config.fp32_dots!r}")
  if config.gate_cumsum not in reference.CUMSUM_METHODS:
    raise ValueError(f"KernelConfig.gate_cumsum must be one of {reference.CUMSUM_METHODS}; "
                     f"got {config.gate_cumsum!r}")
  if config.forward_backend not in FORWARD_BACKENDS:
    raise ValueError(f"KernelConfig.forward_backend must be one of {FORWARD_BACKENDS}; "
                     f"got {config.forward_backend!r}")
  if config.state_segments < 1:
    raise ValueError(f"KernelConfig.state_segments must be >= 1; got {config.state_segments!r}")
  if config.intra not in INTRA_MODES:
    raise ValueError(f"KernelConfig.intra must be one of {INTRA_MODES}; got {config.intra!r}")


def default_chunk_size(tokens: int) -> int:
  """fla's rule: 64, or the next power of two >= 16 for short sequences."""
  return min(64, max(16, 1 << max(0, (tokens - 1).bit_length())))


# ----------------------------------------------------------------------------------------------- pallas calls


def _common(q: Array, cfg: KernelConfig):
  """Matmul operand dtype and precision: bf16 for bf16 inputs; fp32 with IEEE (HIGHEST) or TF32 dots."""
  mm_dtype = jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16
  ieee = mm_dtype == jnp.float32 and cfg.fp32_dots == "ieee"
  prec = jax.lax.Precision.HIGHEST if ieee else jax.lax.Precision.DEFAULT
  return dict(mm_dtype=mm_dtype, prec=prec)


# `jax.default_matmul_precision` values under which fp32 inputs use TF32 dots in the kernels (the caller has
# accepted reduced-precision fp32 matmuls for XLA's GEMMs); anything else (unset, "highest", "float32"):
# IEEE fp32 dots.
TF32_CONTEXTS = ("tensorfloat32", "bfloat16", "fastest", "default", "high")


def fp32_dots_from_context() -> str:
  value = jax.config.jax_default_matmul_precision
  return "tf32" if value is not None and str(value).lower() in TF32_CONTEXTS else "ieee"


def _state_dtype(x: Array):
  """Stored states h_n / D_n: bf16 for bf16 inputs (they feed bf16 matmuls and a fp32 row sum), else fp32."""
  return jnp.float32 if x.dtype == jnp.float32 else jnp.bfloat16


def _call(kernel, cfg: KernelConfig, warps: int, grid, in_specs, out_specs, out_shape):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=cfg.stages),
      interpret=cfg.interpret)


def _seq_spec(tokens: int, width: int, tiled_dim: int | None = None):
  """Whole-sequence block of one (batch, head) and one tile of `width` channels; grid (b, h, *tiles)."""
  if tiled_dim is None:
    return pl.BlockSpec((None, tokens, None, width), lambda b, h, *t: (b, 0, h, 0))
  return pl.BlockSpec((None, tokens, None, width), lambda b, h, *t: (b, 0, h, t[tiled_dim]))


def _fused_forward(q, k, v, g, cfg: KernelConfig, save_states: bool):
  b, tokens, heads, dim_k = q.shape
  dim_v = v.shape[-1]
  bv = min(cfg.fwd_block_v, dim_v)
  nt = tokens // cfg.chunk_size
  out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_specs = [_seq_spec(tokens, bv, 0)]
  if save_states:
    out_shape.append(jax.ShapeDtypeStruct((b, nt, heads, dim_k, dim_v), _state_dtype(q)))
    out_specs.append(pl.BlockSpec((None, nt, None, dim_k, bv), lambda i, j, t: (i, 0, j, 0, t)))
  kernel = functools.partial(gpu_kernels.fused_fwd_kernel, cfg=cfg, num_chunks=nt, **_common(q, cfg))
  outs = _call(kernel, cfg, cfg.warps_fused, (b, heads, dim_v // bv),
               [_seq_spec(tokens, dim_k), _seq_spec(tokens, dim_k), _seq_spec(tokens, bv, 0),
                _seq_spec(tokens, dim_k)], out_specs, out_shape)(q, k, v, g)
  return outs[0], (outs[1] if save_states else None)


def state_segments(cfg: KernelConfig, num_chunks: int) -> int:
  """How many segments the state passes run in: the largest divisor of num_chunks <= cfg.state_segments."""
  return max(d for d in range(1, cfg.state_segments + 1) if num_chunks % d == 0)


def _state_pass(kernel_fn, inputs, widths: str, dim_v: int, cfg: KernelConfig, g: Array, reverse: bool):
  """One sequential pass over the chunks producing a [B, NT, H, K, V] state per chunk, tiled over (K, V).

  `inputs` are [B, T, H, K] or [B, T, H, V] tensors; `widths` says which, one letter ("k"/"v") per input. For
  the forward state pass (k, v, G) and the backward one (q, G, dO, `reverse`). With several segments
  (`state_segments`) each runs from a zero state in parallel and the result is a `SegmentedStates` (its
  parts from `_join_segments`), else the states themselves.
  """
  b, tokens, heads, dim_k = inputs[0].shape
  bk, bv = min(cfg.state_block_k, dim_k), min(cfg.state_block_v, dim_v)
  nt = tokens // cfg.chunk_size
  segments = state_segments(cfg, nt)
  kernel = functools.partial(kernel_fn, cfg=cfg, num_chunks=nt // segments, **_common(inputs[0], cfg))
  specs = [_seq_spec(tokens, bk, 0) if w == "k" else _seq_spec(tokens, bv, 1) for w in widths]
  out_specs = [pl.BlockSpec((None, nt, None, bk, bv), lambda i, j, kt, vt, *s: (i, 0, j, kt, vt))]
  out_shape = [jax.ShapeDtypeStruct((b, nt, heads, dim_k, dim_v), _state_dtype(inputs[0]))]
  if segments > 1:
    out_specs.append(pl.BlockSpec((None, None, None, bk, bv), lambda i, j, kt, vt, s: (i, s, j, kt, vt)))
    out_shape.append(jax.ShapeDtypeStruct((b, segments, heads, dim_k, dim_v), jnp.float32))
  grid = (b, heads, dim_k // bk, dim_v // bv) + ((segments,) if segments > 1 else ())
  outs = _call(kernel, cfg, cfg.warps_state, grid, specs, out_specs, out_shape)(*inputs)
  if segments == 1:
    return outs[0]
  gamma = g[:, cfg.chunk_size - 1::cfg.chunk_size]  # each chunk's total log decay, [B, NT, H, K]
  return _join_segments(*outs, gamma, reverse)


class SegmentedStates(NamedTuple):
  """The states of a segmented pass, not summed up: h_n = local[n] + decay[n] * carry[segment of n].

  The kernels that read states add the two parts as they load them (`gpu_kernels.load_state`), so no pass
  over every state joins them; `materialize` does (for the one-kernel gradient, `grad_version=1`).
  """
  local: Array   # [B, NT, H, K, V], bf16 for bf16 inputs: what the segment's own chunks put in
  carry: Array   # [B, S, H, K, V] fp32: the state entering each segment (from its right when reverse)
  decay: Array   # [B, NT, H, K] fp32: e^(sum of the log decays between the segment's border and chunk n)

  def materialize(self) -> Array:
    carry = jnp.repeat(self.carry, self.local.shape[1] // self.carry.shape[1], axis=1)
    return (self.local.astype(jnp.float32) + self.decay[..., None] * carry).astype(self.local.dtype)


def _join_segments(local: Array, ends: Array, gamma: Array, reverse: bool) -> SegmentedStates:
  """The parts of a segmented pass's K x V states (`segment_join.join`)."""
  return SegmentedStates(local, *segment_join.join(ends, gamma, reverse, k_axis=-2))


def _states(k, v, g, cfg: KernelConfig):
  return _state_pass(gpu_kernels.state_kernel, (k, v, g), "kvk", v.shape[-1], cfg, g, reverse=False)


def _chunk_spec(c: int, width: int, tiled: bool = False):
  if tiled:
    return pl.BlockSpec((None, c, None, width), lambda b, h, n, t: (b, n, h, t))
  return pl.BlockSpec((None, c, None, width), lambda b, h, n, *t: (b, n, h, 0))


def _state_operands(states, block: tuple[int, int], tiled: str):
  """Operands and BlockSpecs that give a chunk-parallel kernel (grid (b, h, n, tile)) chunk n's state: a
  `block` of the K x V state at the grid's K tile (`tiled="k"`) or V tile ("v"). A `SegmentedStates` passes
  its three parts (the kernel adds them: `gpu_kernels.load_state`)."""
  def spec(shape, chunk_index, tile_index):
    return pl.BlockSpec((None, None, None) + shape,
                        lambda i, j, n, t: (i, chunk_index(n), j) + tile_index(t))
  at = (lambda t: (t, 0)) if tiled == "k" else (lambda t: (0, t))
  if not isinstance(states, SegmentedStates):
    return [states], [spec(block, lambda n: n, at)]
  per_segment = states.local.shape[1] // states.carry.shape[1]
  return list(states), [spec(block, lambda n: n, at), spec(block, lambda n: n // per_segment, at),
                        spec(block[:1], lambda n: n, lambda t: at(t)[:1])]


def _outputs(q, k, v, g, hs, cfg: KernelConfig):
  b, tokens, heads, dim_k = q.shape
  dim_v = v.shape[-1]
  c, bv = cfg.chunk_size, min(cfg.fwd_block_v, dim_v)
  h_ops, h_specs = _state_operands(hs, (dim_k, bv), "v")
  kernel = functools.partial(gpu_kernels.out_kernel, cfg=cfg, state_refs=len(h_ops), **_common(q, cfg))
  return _call(kernel, cfg, cfg.warps_out, (b, heads, tokens // c, dim_v // bv),
               [_chunk_spec(c, dim_k), _chunk_spec(c, dim_k), _chunk_spec(c, bv, True), _chunk_spec(c, dim_k),
                *h_specs],
               _chunk_spec(c, bv, True), jax.ShapeDtypeStruct(v.shape, v.dtype))(q, k, v, g, *h_ops)


def _two_pass_forward(q, k, v, g, cfg: KernelConfig):
  hs = _states(k, v, g, cfg)
  return _outputs(q, k, v, g, hs, cfg), hs


def _dstates(q, g, do, cfg: KernelConfig):
  return _state_pass(gpu_kernels.dstate_kernel, (q, g, do), "kkv", do.shape[-1], cfg, g, reverse=True)


def _grads(q, k, v, g, do, hs, ds, cfg: KernelConfig):
  b, tokens, heads, dim_k = q.shape
  dim_v = v.shape[-1]
  c, nt = cfg.chunk_size, tokens // cfg.chunk_size
  common = _common(q, cfg)
  chunk_k = _chunk_spec(c, dim_k)
  dqk_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)]
  if cfg.grad_version == 1:
    hs, ds = (x.materialize() if isinstance(x, SegmentedStates) else x for x in (hs, ds))
    state_spec = pl.BlockSpec((None, None, None, dim_k, dim_v), lambda i, j, n: (i, n, j, 0, 0))
    chunk_v = _chunk_spec(c, dim_v)
    kernel = functools.partial(gpu_kernels.grad_kernel, cfg=cfg, **common)
    dq, dk, dv, dg = _call(kernel, cfg, cfg.warps_grad, (b, heads, nt),
                           [chunk_k, chunk_k, chunk_v, chunk_k, chunk_v, state_spec, state_spec],
                           [chunk_k, chunk_k, chunk_v, chunk_k],
                           dqk_shapes + [jax.ShapeDtypeStruct(v.shape, v.dtype),
                                         jax.ShapeDtypeStruct(g.shape, jnp.float32)])(q, k, v, g, do, hs, ds)
    return dq, dk, dv, dg
  bv = min(cfg.fwd_block_v, dim_v)
  d_ops, d_specs = _state_operands(ds, (dim_k, bv), "v")
  dv_kernel = functools.partial(gpu_kernels.dv_kernel, cfg=cfg, state_refs=len(d_ops), **common)
  dv = _call(dv_kernel, cfg, cfg.warps_out, (b, heads, nt, dim_v // bv),
             [chunk_k, chunk_k, chunk_k, _chunk_spec(c, bv, True), *d_specs],
             _chunk_spec(c, bv, True), jax.ShapeDtypeStruct(v.shape, v.dtype))(q, k, g, do, *d_ops)
  # dq/dk/dG over (chunk, K tile): every output channel needs only its own q, k, G and state rows.
  bk = min(cfg.grad_block_k, dim_k)
  tile_k = pl.BlockSpec((None, c, None, bk), lambda i, j, n, kt: (i, n, j, kt))
  whole_v = pl.BlockSpec((None, c, None, dim_v), lambda i, j, n, kt: (i, n, j, 0))
  h_ops, h_specs = _state_operands(hs, (bk, dim_v), "k")
  d_ops, d_specs = _state_operands(ds, (bk, dim_v), "k")
  dqk_kernel = functools.partial(gpu_kernels.dqk_kernel, cfg=cfg, state_refs=(len(h_ops), len(d_ops)),
                                 **common)
  dq, dk, dg = _call(dqk_kernel, cfg, cfg.warps_grad, (b, heads, nt, dim_k // bk),
                     [tile_k, tile_k, whole_v, tile_k, whole_v, *h_specs, *d_specs],
                     [tile_k, tile_k, tile_k],
                     dqk_shapes + [jax.ShapeDtypeStruct(g.shape, jnp.float32)])(
                         q, k, v, g, do, *h_ops, *d_ops)
  return dq, dk, dv, dg


def mosaic_segments(batch_heads: int, num_chunks: int) -> int:
  """Segments of `gpu_mosaic.state_pass`: the largest divisor of the chunk count <= min(16, the number that
  brings the (batch x head) programs to about STATE_TARGET_PROGRAMS) (session 11, H100, NOTES.md)."""
  target = min(16, -(-STATE_TARGET_PROGRAMS // batch_heads))
  return max(d for d in range(1, target + 1) if num_chunks % d == 0)


def uses_mosaic_forward(q: Array, v: Array, cfg: KernelConfig) -> bool:
  """Whether a forward without a gradient runs `gpu_mosaic` (compiled, not interpreted; supported shape)."""
  return (cfg.forward_backend == "mosaic" and not cfg.interpret
          and gpu_mosaic.supported(q.shape, v.shape, jnp.promote_types(q.dtype, v.dtype), cfg.chunk_size))


def _mosaic_segments(q: Array, cfg: KernelConfig) -> int:
  return mosaic_segments(q.shape[0] * q.shape[2], q.shape[1] // cfg.chunk_size)


def _forward(q, k, v, g, cfg: KernelConfig, save_states: bool):
  if not save_states and uses_mosaic_forward(q, v, cfg):
    return gpu_mosaic.forward(q, k, v, g, scale=cfg.scale, segments=_mosaic_segments(q, cfg)), None
  if cfg.fused:
    return _fused_forward(q, k, v, g, cfg, save_states)
  return _two_pass_forward(q, k, v, g, cfg)


# ------------------------------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gla_chunked_g(q: Array, k: Array, v: Array, g: Array, cfg: KernelConfig) -> Array:
  """GLA on chunk-padded inputs with G = chunk-local cumsum of the log gate (fp32); T % chunk == 0."""
  return _forward(q, k, v, g, cfg, save_states=False)[0]


def _vjp_fwd(q, k, v, g, cfg):
  o, hs = _forward(q, k, v, g, cfg, save_states=True)
  return o, (q, k, v, g, hs)


def _vjp_bwd(cfg, residuals, do):
  q, k, v, g, hs = residuals
  do = do.astype(v.dtype)
  ds = _dstates(q, g, do, cfg)
  return tuple(_grads(q, k, v, g, do, hs, ds, cfg))


gla_chunked_g.defvjp(_vjp_fwd, _vjp_bwd)


def _gate_cumsum(log_gate: Array, cfg: KernelConfig) -> Array:
  return reference.chunk_local_cumsum(log_gate, cfg.chunk_size, cfg.gate_cumsum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gla_chunked_log_gate(q: Array, k: Array, v: Array, log_gate: Array, cfg: KernelConfig) -> Array:
  """`gla_chunked_g` from the chunk-padded fp32 log gate: XLA's chunk-local cumsum, then the kernels. A
  forward without a gradient on the Mosaic path (`uses_mosaic_forward`) has its state pass form G and write
  it for the output pass instead (`gpu_mosaic.state_pass_from_log_gate`, session 12: no cumsum pass). The
  VJP is `gla_chunked_g`'s through the cumsum."""
  if uses_mosaic_forward(q, v, cfg):
    return gpu_mosaic.forward(q, k, v, log_gate, scale=cfg.scale, segments=_mosaic_segments(q, cfg),
                              raw_gate=True)
  return gla_chunked_g(q, k, v, _gate_cumsum(log_gate, cfg), cfg)


def _log_gate_vjp_fwd(q, k, v, log_gate, cfg):
  return _vjp_fwd(q, k, v, _gate_cumsum(log_gate, cfg), cfg)


def _log_gate_vjp_bwd(cfg, residuals, do):
  dq, dk, dv, dg = _vjp_bwd(cfg, residuals, do)
  (d_log_gate,) = jax.linear_transpose(lambda x: _gate_cumsum(x, cfg),
                                       jax.ShapeDtypeStruct(dg.shape, jnp.float32))(dg)
  return dq, dk, dv, d_log_gate


gla_chunked_log_gate.defvjp(_log_gate_vjp_fwd, _log_gate_vjp_bwd)


def _prepare(q, k, v, chunk_size, scale, interpret, config):
  """Checks, the kernels' dtype, the chunk and the final KernelConfig; q, k, v padded to whole chunks."""
  dtype = jnp.promote_types(q.dtype, jnp.promote_types(k.dtype, v.dtype))  # what the kernels run on
  if not is_supported(q.shape, v.shape, dtype):
    raise ValueError(f"pallas_gpu GLA supports bf16/fp32 with head dims powers of two in [{MIN_DIM}, "
                     f"{MAX_DIM}]; got q{q.shape} v{v.shape}, q {q.dtype}, "
                     f"k {k.dtype}, v {v.dtype}. Use impl='chunked' (impl='auto' does so by itself).")
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  c = default_chunk_size(q.shape[1]) if chunk_size is None else chunk_size
  if not (_is_pow2(c) and 16 <= c <= 128):
    raise ValueError(f"pallas_gpu chunk_size must be a power of two in [16, 128]; got {c}")
  if config is None:
    config = dataclasses.replace(tuned_config(q.shape, v.shape, c, dtype),
                                 fp32_dots=fp32_dots_from_context())
  _check_config(config)
  cfg = dataclasses.replace(config, chunk_size=c, interpret=interpret,
                            scale=float(q.shape[-1] ** -0.5 if scale is None else scale))
  return tuple(reference.pad_to_chunks(x, c) for x in (q, k, v)), cfg


def gla(q: Array, k: Array, v: Array, log_gate: Array, *, chunk_size: int | None = None,
        scale: float | None = None, interpret: bool = False, config: KernelConfig | None = None) -> Array:
  """Causal GLA over [batch, tokens, heads, dim] tensors (see `reference.recurrent_gla`); differentiable.

  `config` overrides the tuned kernel tiling (`tuned_config`); its chunk_size/scale/interpret fields are
  replaced by the arguments. fp32 inputs use IEEE fp32 dots unless the caller runs under a reduced-precision
  `jax.default_matmul_precision` (e.g. "tensorfloat32", the paper's fp32 training): then TF32 tensor-core
  dots, as XLA's own fp32 GEMMs and fla's Triton kernels use (`TF32_CONTEXTS`; a given `config` keeps its
  own `fp32_dots`).
  """
  reference._check_shapes(q, k, v, log_gate, None)
  (qp, kp, vp), cfg = _prepare(q, k, v, chunk_size, scale, interpret, config)
  log_gate = reference.pad_to_chunks(log_gate.astype(jnp.float32), cfg.chunk_size)
  return gla_chunked_log_gate(qp, kp, vp, log_gate, cfg)[:, :q.shape[1]].astype(v.dtype)


def low_rank_gate_supported(gate: LowRankGate, q_shape: tuple[int, ...], chunk_size: int | None) -> bool:
  """Whether `gla_low_rank_gate` runs the gate kernels for this shape (else ops evaluates the gate in XLA)."""
  chunk = default_chunk_size(q_shape[1]) if chunk_size is None else chunk_size
  return gpu_gate.is_supported(gate, q_shape, chunk)


def gla_low_rank_gate(q: Array, k: Array, v: Array, gate: LowRankGate, *, chunk_size: int | None = None,
                      scale: float | None = None, interpret: bool = False,
                      config: KernelConfig | None = None) -> Array:
  """`gla` with fla's low-rank forget gate (`gate.LowRankGate`) formed by `gpu_gate`'s kernels.

  The gate's projections, log-sigmoid and chunk-local cumsum run in one Pallas kernel (and their gradients in
  one more) instead of XLA's gate ops and the op's own cumsum and transpose passes; the GLA kernels are the
  same (`gla_chunked_g`). Same arguments and result as `gla`.
  """
  gate.check(q.shape)
  (qp, kp, vp), cfg = _prepare(q, k, v, chunk_size, scale, interpret, config)
  if not low_rank_gate_supported(gate, q.shape, cfg.chunk_size):
    raise ValueError(f"pallas_gpu low-rank gate kernels need a rank and head dim that are powers of two "
                     f">= 16 and D a multiple of 16; got w_down{gate.w_down.shape} q{q.shape}")
  spec = gpu_gate.gate_spec(gate, q.shape, cfg.chunk_size, interpret)
  x = reference.pad_to_chunks(gate.x, cfg.chunk_size)
  g = gpu_gate.cumulative_low_rank_gate(x, gate.w_down, gate.w_up, gate.b_up, spec)
  g = g.reshape(*g.shape[:2], q.shape[2], q.shape[3])
  return gla_chunked_g(qp, kp, vp, g, cfg)[:, :q.shape[1]].astype(v.dtype)
