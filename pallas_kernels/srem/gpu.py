"""SREM's depthwise conv, bias and scan-order change as one Pallas GPU kernel (Triton) each way.

`conv_reorient(x, kernel, bias, grid=, reorient=)` computes `reference.conv_reorient`: a k x k depthwise conv
with bias of tokens x [N, T, D] on the block's (rows, cols) grid, written straight into the next block's token
order. In XLA that is a conv (cuDNN, or the shifted-tap fusion), a bias add and a copy for the permutation,
and in the backward a second copy, the input gradient, cuDNN's filter gradient and a bias reduction: at
DiG-S/2's 256 px step about six kernels per block (benchmarks/NOTES.md, session 17).

Forward, one program per (image, tile of BT output positions, tile of BD channels): each output position j
finds the conv position s(j) it receives (the reorientation, integer arithmetic on the static grid), gathers
the k*k neighbours of s(j) from x with boundary masks, and stores the fp32 sum plus bias, cast to x's dtype,
at j. Backward, one program per (image, tile of input positions q, channel tile): for each tap the conv
output that x[q] feeds is y[q - offset], whose gradient sits at s^-1(q - offset) in the incoming gradient;
the same gathered tile gives dx (times the tap) and the tap's share of the filter gradient (times x[q],
summed over the tile), and the centre tap's the bias gradient. XLA sums the shares over (image, tile), which
keeps the gradients deterministic (no atomics).

Gathers read through L1/L2: every input element is read k*k times, as XLA's shifted-tap fusion does. Tiles
are powers of two (Triton); T and D need not be (masked). `interpret=True` runs the same bodies through
Pallas' interpreter (CPU tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.srem.reference import Grid, check_reorientation, next_grid

Array = jax.Array
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))  # the model's compute dtypes (tested)
# (largest token tile, largest channel tile, warps) of the forward and of the backward kernel; tiles shrink
# to the next power of two of T and D. Measured with `benchmarks/srem_kernel.py --tile_sweep` (H100,
# benchmarks/NOTES.md session 17): backward tiles of 32 tokens with 2 warps instead of (128, 64, 4) took a
# 12-block chain at 256 px from 0.061 to 0.046 ms per block (1792 px: 0.132 -> 0.134); forward tiles of 64
# tokens 0.061 -> 0.057 (0.132 -> 0.126); both together, timed again: 0.0465 vs 0.0588 (0.1295 vs 0.1520).
FORWARD_CONFIG = (64, 64, 4)
BACKWARD_CONFIG = (32, 64, 2)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def is_supported(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], dtype) -> bool:
  """Tokens [N, T, D] in bf16 or fp32 with an odd square k x k kernel [k, k, D]."""
  if len(x_shape) != 3 or len(kernel_shape) != 3:
    return False
  k = kernel_shape[0]
  return (kernel_shape[1] == k and k % 2 == 1 and kernel_shape[2] == x_shape[2]
          and jnp.dtype(dtype) in SUPPORTED_DTYPES)


def _transposed(u: Array, rows: int, cols: int) -> Array:
  """Position of flat index u of a (rows, cols) grid in the transposed (cols, rows) grid."""
  return jax.lax.rem(u, cols) * rows + jax.lax.div(u, cols)


def _source_position(j: Array, grid: Grid, reorient: str) -> Array:
  """s(j): the position (in the conv's order) whose output lands at position j of the reoriented tokens."""
  rows, cols = grid
  if reorient == "none":
    return j
  # Reversing is last - u; "flip_transpose" reverses on (rows, cols), then transposes to (cols, rows).
  return rows * cols - 1 - (j if reorient == "flip" else _transposed(j, cols, rows))


def _target_position(p: Array, grid: Grid, reorient: str) -> Array:
  """s^-1(p): where the conv output at position p (>= 0) lands after the reorientation."""
  rows, cols = grid
  if reorient == "none":
    return p
  flipped = rows * cols - 1 - p
  return flipped if reorient == "flip" else _transposed(flipped, rows, cols)


def _tiles(t: int, d: int, config: tuple[int, int, int]) -> tuple[int, int]:
  return min(config[0], _next_pow2(t)), min(config[1], _next_pow2(d))


def _neighbour(pos: Array, valid: Array, grid: Grid, dr: int, dc: int) -> tuple[Array, Array]:
  """(flat position of the grid neighbour (row + dr, col + dc) of `pos`, mask of those inside the grid)."""
  rows, cols = grid
  safe = jnp.where(valid, pos, 0)
  r = jax.lax.div(safe, cols) + dr
  c = jax.lax.rem(safe, cols) + dc
  inside = valid & (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
  return jnp.where(inside, r * cols + c, 0), inside


def _forward_kernel(x_ref, kernel_ref, bias_ref, out_ref, *, grid: Grid, reorient: str, k: int, bt: int,
                    bd: int):
  n, ti, di = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t, d = x_ref.shape[1], x_ref.shape[2]
  j = ti * bt + jnp.arange(bt, dtype=jnp.int32)
  ch = di * bd + jnp.arange(bd, dtype=jnp.int32)
  valid_j, valid_c = j < t, ch < d
  src = _source_position(jnp.where(valid_j, j, 0), grid, reorient)
  pad = k // 2
  acc = jnp.zeros((bt, bd), jnp.float32)
  for a in range(k):
    for b in range(k):
      pos, inside = _neighbour(src, valid_j, grid, a - pad, b - pad)
      xv = pltriton.load(x_ref.at[n, pos[:, None], ch[None, :]], mask=inside[:, None] & valid_c[None, :],
                         other=0)
      tap = pltriton.load(kernel_ref.at[a * k + b, ch], mask=valid_c, other=0)
      acc += xv.astype(jnp.float32) * tap.astype(jnp.float32)[None, :]
  acc += pltriton.load(bias_ref.at[ch], mask=valid_c, other=0).astype(jnp.float32)[None, :]
  pltriton.store(out_ref.at[n, j[:, None], ch[None, :]], acc.astype(out_ref.dtype),
                 mask=valid_j[:, None] & valid_c[None, :])


def _backward_kernel(x_ref, kernel_ref, dout_ref, dx_ref, dk_ref, db_ref, *, grid: Grid, reorient: str,
                     k: int, bt: int, bd: int):
  n, ti, di = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t, d = x_ref.shape[1], x_ref.shape[2]
  q = ti * bt + jnp.arange(bt, dtype=jnp.int32)
  ch = di * bd + jnp.arange(bd, dtype=jnp.int32)
  valid_q, valid_c = q < t, ch < d
  mask = valid_q[:, None] & valid_c[None, :]
  xv = pltriton.load(x_ref.at[n, q[:, None], ch[None, :]], mask=mask, other=0).astype(jnp.float32)
  pad = k // 2
  dx = jnp.zeros((bt, bd), jnp.float32)
  for a in range(k):
    for b in range(k):
      # x[q] feeds the conv output at q - offset; that output's gradient sits at s^-1(q - offset).
      pos, inside = _neighbour(q, valid_q, grid, pad - a, pad - b)
      target = _target_position(pos, grid, reorient)
      dy = pltriton.load(dout_ref.at[n, target[:, None], ch[None, :]],
                         mask=inside[:, None] & valid_c[None, :], other=0).astype(jnp.float32)
      tap = pltriton.load(kernel_ref.at[a * k + b, ch], mask=valid_c, other=0).astype(jnp.float32)
      dx += dy * tap[None, :]
      pltriton.store(dk_ref.at[n, ti, a * k + b, ch], jnp.sum(xv * dy, axis=0), mask=valid_c)
      if a == pad and b == pad:
        pltriton.store(db_ref.at[n, ti, ch], jnp.sum(dy, axis=0), mask=valid_c)
  pltriton.store(dx_ref.at[n, q[:, None], ch[None, :]], dx.astype(dx_ref.dtype), mask=mask)


def _forward(x: Array, taps: Array, bias: Array, grid: Grid, reorient: str, interpret: bool) -> Array:
  n, t, d = x.shape
  k = int(round(taps.shape[0] ** 0.5))
  bt, bd = _tiles(t, d, FORWARD_CONFIG)
  body = functools.partial(_forward_kernel, grid=grid, reorient=reorient, k=k, bt=bt, bd=bd)
  return pl.pallas_call(
      body, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(n, pl.cdiv(t, bt), pl.cdiv(d, bd)),
      interpret=interpret, name="srem_conv_reorient",
      compiler_params=pltriton.CompilerParams(num_warps=FORWARD_CONFIG[2], num_stages=1))(x, taps, bias)


def _backward(x: Array, taps: Array, dout: Array, grid: Grid, reorient: str, interpret: bool
              ) -> tuple[Array, Array, Array]:
  n, t, d = x.shape
  k2 = taps.shape[0]
  bt, bd = _tiles(t, d, BACKWARD_CONFIG)
  tiles = pl.cdiv(t, bt)
  body = functools.partial(_backward_kernel, grid=grid, reorient=reorient, k=int(round(k2 ** 0.5)), bt=bt,
                           bd=bd)
  out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype),
               jax.ShapeDtypeStruct((n, tiles, k2, d), jnp.float32),
               jax.ShapeDtypeStruct((n, tiles, d), jnp.float32))
  dx, dk_shares, db_shares = pl.pallas_call(
      body, out_shape=out_shape, grid=(n, tiles, pl.cdiv(d, bd)), interpret=interpret,
      name="srem_conv_reorient_bwd",
      compiler_params=pltriton.CompilerParams(num_warps=BACKWARD_CONFIG[2], num_stages=1))(x, taps, dout)
  return dx, dk_shares.sum(axis=(0, 1)), db_shares.sum(axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv_reorient(x, taps, bias, grid, reorient, interpret):
  return _forward(x, taps, bias, grid, reorient, interpret)


def _conv_reorient_fwd(x, taps, bias, grid, reorient, interpret):
  return _forward(x, taps, bias, grid, reorient, interpret), (x, taps, bias)


def _conv_reorient_bwd(grid, reorient, interpret, residuals, dout):
  x, taps, bias = residuals
  dx, dtaps, dbias = _backward(x, taps, dout, grid, reorient, interpret)
  return dx, dtaps.astype(taps.dtype), dbias.astype(bias.dtype)


_conv_reorient.defvjp(_conv_reorient_fwd, _conv_reorient_bwd)


def conv_reorient(x: Array, kernel: Array, bias: Array, *, grid: Grid, reorient: str,
                  interpret: bool = False) -> Array:
  """`reference.conv_reorient` as Pallas GPU kernels (forward and gradients w.r.t. x, kernel and bias).

  x [N, T, D] on `grid` (rows * cols = T), kernel [k, k, D] (k odd), bias [D]; returns x's dtype in the new
  order (on `reference.next_grid(grid, reorient)`).
  """
  check_reorientation(reorient)
  n, t, d = x.shape
  grid = tuple(int(g) for g in grid)
  if grid[0] * grid[1] != t:
    raise ValueError(f"grid {grid} does not hold {t} tokens")
  if not is_supported(x.shape, kernel.shape, x.dtype) or bias.shape != (d,):
    raise ValueError(f"srem GPU kernel: unsupported x{x.shape} {x.dtype}, kernel{kernel.shape}, "
                     f"bias{bias.shape}; expected [N, T, D], an odd [k, k, D] kernel and a [D] bias")
  k = kernel.shape[0]
  return _conv_reorient(x, kernel.reshape(k * k, d), bias, grid, reorient, interpret)


__all__ = ["conv_reorient", "is_supported", "next_grid"]
