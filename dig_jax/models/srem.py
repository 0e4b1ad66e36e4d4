"""SREM, DiG's spatial reorientation and enhancement module: scan-order schedule and the 3x3 depthwise conv.

Scan order (official `bid_mode='layer'`, `if_quad_dir=True`, i.e. `scan_schedule="crisscross"`): after
block i the token sequence is reversed (flip along T) and, if i is odd, viewed as its current (rows, cols)
grid, transposed and flattened again; on a non-square grid the transpose swaps rows and cols, so the current
grid shape is tracked. Block i therefore sees raster / reversed raster / column-major / reversed column-major
order for i mod 4 = 0 / 1 / 2 / 3. "flip" reverses only (no transpose); "causal" never reorients (the ablation
rows of dig_spec.md §5.3). The tokens are physically permuted, as in the official code, so the depthwise conv
of block i acts on the grid in that block's orientation and official conv kernels load unchanged.

The final layer must see raster order whatever the depth: the composed permutation is tracked statically and
undone with one gather when it is not the identity (for depth % 4 == 0 it is, as in the official models, and
nothing is done). Deviation: the official code assumes depth % 4 == 0 and never restores the order.

Depthwise conv: Conv2d(D, D, 3, stride 1, padding 1, groups=D, bias) on the token grid; its output replaces
the tokens (no residual). Kernel stored HWIO [3, 3, 1, D] (torch weight [D, 1, 3, 3] -> permute(2, 3, 1, 0)),
bias [D]. Init "identity" (centre tap 1, others 0, bias 0; the released config) or "random" (PyTorch's
default Conv2d init, U(-1/3, 1/3) for kernel and bias with fan_in 9: our reading of the paper's "random init"
ablation row, whose code is not released).

How the conv is computed (`dwconv_impl`; same parameters, same function, tested against each other):
"conv" is XLA's grouped convolution, a cuDNN call on GPU for the forward, the input gradient (both
`convForward`) and the weight gradient (`convBackwardFilter`); XLA's autotuner picks cuDNN's algorithm at
every compilation. 3 of 24 fresh compilations of DiG-S/2's 256 px step (sessions 14-16, H200 and H100) gave a
program 1.46-1.48x slower to train and 1.7-1.9x slower to sample, for as long as it served: cuDNN's legacy
algorithm 0 instead of 5 in all 24 `convForward` calls (forced on an H100 in session 16, every other choice
equal: 1.43-1.46x slower).
"taps" computes the forward and the input gradient as a sum of the k*k shifted, per-channel scaled token
grids (an XLA loop fusion, accumulated in fp32: nothing for the autotuner to pick) and keeps cuDNN's
backward-filter conv for the weight gradient (its algorithm did not vary), through a custom VJP. Training
throughput against a well-picked cuDNN conv (bf16, DiG-S/2, medians of fresh compilations): H200 1.01x at
256 px (inside the run spread) and 0.97x at 1792 px, H100 0.96x at 256 px (benchmarks/NOTES.md, sessions
15-16). Both leave the reorientation to XLA: a copy of the tokens per block each way.
"pallas" is `pallas_kernels.srem`'s GPU kernel: conv, bias and the reorientation that follows the block in one
Triton kernel forward (written straight into the next block's order) and one backward (input, kernel and
bias gradients), split over the mesh's batch axes under `jax.shard_map`; no cuDNN, nothing autotuned. On an
H100 (session 17, DiG-S/2 bf16, fresh compilations) against taps: training 1.02x at 256 px (medians of
three, ranges overlapping) and 1.02x at 1792 px (two each, ranges apart; XLA's conv 1.015x), sampling
forward 1.04x at both; with today's smaller tiles (the op 1.2-1.3x faster in a 12-block chain) a last
command saw +0.6 % and -2.0 % in two training pairs (within its spread) and a 4.8 % faster sampling forward.
Off the GPU it runs in Pallas' interpreter (tests only).
"auto" (the default) takes "pallas" on GPUs and "conv" elsewhere: TPUs have no cuDNN to pick from and no
Triton, and on the CPU the taps form compiled ~1.6x slower (a 4-block test model's training step: 11.8-14.3 s
vs 7.4-7.8 s) for the same speed.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.srem import ops as srem_ops
from pallas_kernels.srem.reference import check_reorientation

from dig_jax.models import partitioning as pt

SCAN_SCHEDULES = ("crisscross", "flip", "causal")
DWCONV_MODES = ("identity", "random", "off")
DWCONV_IMPLS = ("auto", "taps", "conv", "pallas")  # the first is the default
Grid = tuple[int, int]
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def reorientation_after_block(block_index: int, schedule: str) -> str:
  """The scan-order change after block `block_index`: "none", "flip" or "flip_transpose" (the names of
  `pallas_kernels.srem.reference.REORIENTATIONS`)."""
  if schedule not in SCAN_SCHEDULES:
    raise ValueError(f"unknown scan_schedule {schedule!r}; choose one of {SCAN_SCHEDULES}")
  if schedule == "causal":
    return "none"
  return "flip_transpose" if schedule == "crisscross" and block_index % 2 == 1 else "flip"


def reorient_tokens(x, grid: Grid, reorient: str):
  """Applies a reorientation ("none", "flip", "flip_transpose") to tokens x [N, T, ...] on a (rows, cols)
  grid. Works on jax and numpy arrays. Returns (x, new_grid)."""
  check_reorientation(reorient)
  if reorient == "none":
    return x, grid
  x = x[:, ::-1]
  rows, cols = grid
  if reorient == "flip_transpose":
    n, rest = x.shape[0], x.shape[2:]
    x = x.reshape(n, rows, cols, *rest).swapaxes(1, 2).reshape(n, rows * cols, *rest)
    grid = (cols, rows)
  return x, grid


def reorient_after_block(x, grid: Grid, block_index: int, schedule: str):
  """Applies the scan-order change after block `block_index` to tokens x [N, T, ...] on a (rows, cols) grid.

  Works on jax and numpy arrays. Returns (x, new_grid).
  """
  return reorient_tokens(x, grid, reorientation_after_block(block_index, schedule))


def schedule_period(schedule: str, grid: Grid) -> int:
  """How many consecutive blocks form the schedule's repeating unit (what a stacked-blocks scan groups).

  "flip" and "causal" do the same after every block (1); "crisscross" transposes after odd blocks, so pairs
  repeat on a square grid (2) and, since each transpose swaps a non-square grid's shape, quadruples otherwise.
  """
  if schedule != "crisscross":
    return 1
  return 2 if grid[0] == grid[1] else 4


def block_scan_orders(depth: int, grid: Grid, schedule: str
                      ) -> tuple[list[np.ndarray], np.ndarray, list[Grid]]:
  """Static bookkeeping of the schedule.

  Returns (orders, final_order, grids): orders[i][j] is the raster index of the token at sequence position j
  as block i sees it, grids[i] the (rows, cols) grid block i sees, final_order the order after the last block
  (before the restore).
  """
  order = np.arange(grid[0] * grid[1])[None]
  orders, grids = [], []
  for i in range(depth):
    orders.append(order[0].copy())
    grids.append(grid)
    order, grid = reorient_after_block(order, grid, i, schedule)
  return orders, np.asarray(order[0]), grids


def restore_raster(x: jax.Array, final_order: np.ndarray) -> jax.Array:
  """Undoes the composed permutation (x[:, j] holds raster token final_order[j]); no-op for the identity."""
  if np.array_equal(final_order, np.arange(final_order.size)):
    return x
  return jnp.take(x, jnp.asarray(np.argsort(final_order)), axis=1)


def expected_cycle_order(block_index: int, rows: int, cols: int) -> np.ndarray:
  """The documented 4-cycle (independent of the implementation above; used by tests and docs)."""
  grid = np.arange(rows * cols).reshape(rows, cols)
  phase = block_index % 4
  if phase == 0:
    return grid.reshape(-1)              # raster
  if phase == 1:
    return grid.reshape(-1)[::-1]        # reversed raster
  if phase == 2:
    return grid.T.reshape(-1)            # column-major
  return grid.T.reshape(-1)[::-1]        # reversed column-major


class DepthwiseConv(nnx.Module):
  """3x3 depthwise conv with bias on tokens [N, T, D] viewed as the current (rows, cols) grid; no residual."""

  def __init__(self, features: int, *, init: str, rngs: nnx.Rngs, dtype, kernel_size: int = 3,
               impl: str = "auto"):
    if init not in ("identity", "random"):
      raise ValueError(f"unknown dwconv init {init!r}; use 'identity' or 'random'")
    _check_dwconv_impl(impl)  # at build time; "auto" resolves per platform at call time
    if kernel_size % 2 != 1:
      raise ValueError(f"dwconv kernel_size must be odd; got {kernel_size}")
    self.kernel_size = kernel_size
    self.dtype = dtype
    self.impl = impl
    shape = (kernel_size, kernel_size, 1, features)
    if init == "identity":
      centre = kernel_size // 2
      kernel_init = lambda key, s, d: jnp.zeros(s, d).at[centre, centre].set(1.0)  # noqa: E731
      bias_init = pt.zeros
    else:
      bound = 1.0 / np.sqrt(kernel_size * kernel_size)
      kernel_init = bias_init = pt.uniform(bound)
    # "conv" appears on both tap axes: the sharding rules must map it to None (taps are never sharded).
    self.kernel = pt.make_param(rngs, kernel_init, shape, (pt.CONV, pt.CONV, None, pt.EMBED))
    self.bias = pt.make_param(rngs, bias_init, (features,), (pt.EMBED,))

  def __call__(self, x: jax.Array, grid: Sequence[int], reorient: str = "none") -> jax.Array:
    """The conv of tokens x [N, T, D] on `grid`, then the reorientation `reorient` (see
    `reorientation_after_block`); with impl "pallas" both are one GPU kernel each way."""
    n, t, d = x.shape
    rows, cols = grid
    if rows * cols != t:
      raise ValueError(f"grid {tuple(grid)} does not hold {t} tokens")
    return conv_bias_reorient(x.astype(self.dtype), self.kernel.get_value().astype(self.dtype),
                              self.bias.get_value().astype(self.dtype), (rows, cols), reorient, self.impl)


def conv_bias_reorient(x: jax.Array, kernel: jax.Array, bias: jax.Array, grid: Grid, reorient: str,
                       impl: str = "auto") -> jax.Array:
  """Tokens x [N, T, D] on `grid` -> depthwise conv (kernel [k, k, 1, D]) + bias, reoriented: one kernel each
  way for impl "pallas", else `depthwise_conv`, the bias add and XLA's permutation."""
  if resolve_dwconv_impl(impl) == "pallas":
    return conv_reorient_kernel(x, kernel[:, :, 0, :], bias, grid=grid, reorient=reorient)
  n, t, d = x.shape
  y = (depthwise_conv(x.reshape(n, *grid, d), kernel, impl=impl) + bias).reshape(n, t, d)
  with jax.named_scope("reorient"):
    return reorient_tokens(y, grid, reorient)[0]


def _grouped_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """XLA's grouped ("same"-padded, stride 1) convolution of x [N, H, W, D] with kernel [k, k, 1, D]."""
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _shifted_sum(x: jax.Array, taps: jax.Array) -> jax.Array:
  """sum_ij x_padded[:, i:i+H, j:j+W] * taps[i, j] in fp32, cast to x's dtype: the same conv as
  `_grouped_conv` (taps [k, k, D]), written as one elementwise expression that XLA fuses into one loop."""
  _, rows, cols, _ = x.shape
  k = taps.shape[0]
  pad = k // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      term = xp[:, i:i + rows, j:j + cols, :].astype(jnp.float32) * taps[i, j].astype(jnp.float32)
      out = term if out is None else out + term
  return out.astype(x.dtype)


@jax.custom_vjp
def _taps_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _shifted_sum(x, kernel[:, :, 0, :])


def _taps_conv_fwd(x, kernel):
  return _taps_conv(x, kernel), (x, kernel)


def _taps_conv_bwd(residuals, dy):
  x, kernel = residuals
  # Input gradient: the same shifted sum of dy with the kernel rotated by 180 degrees (a fusion again).
  dx = _shifted_sum(dy, kernel[::-1, ::-1, 0, :])
  # Weight gradient: cuDNN's backward-filter conv (the primal conv of this vjp is dead code, removed by XLA).
  dkernel = jax.vjp(functools.partial(_grouped_conv, x), kernel)[1](dy)[0]
  return dx, dkernel


_taps_conv.defvjp(_taps_conv_fwd, _taps_conv_bwd)


def _check_dwconv_impl(impl: str) -> None:
  if impl not in DWCONV_IMPLS:
    raise ValueError(f"unknown dwconv_impl {impl!r}; use one of {DWCONV_IMPLS}")


def resolve_dwconv_impl(impl: str, platform: str | None = None) -> str:
  """"auto" -> "pallas" on GPUs, "conv" elsewhere (`platform`: default JAX backend's); others unchanged."""
  _check_dwconv_impl(impl)
  if impl != "auto":
    return impl
  return "pallas" if (platform or jax.default_backend()) in _GPU_PLATFORMS else "conv"


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, impl: str = "auto") -> jax.Array:
  """Depthwise "same" conv of x [N, H, W, D] with kernel [k, k, 1, D] (k odd), no bias; `impl` as in the
  module docstring ("auto", "taps", "conv" or "pallas"; equal up to rounding)."""
  impl = resolve_dwconv_impl(impl)
  if impl == "pallas":
    n, rows, cols, d = x.shape
    zero_bias = jnp.zeros((d,), x.dtype)
    y = conv_reorient_kernel(x.reshape(n, rows * cols, d), kernel[:, :, 0, :], zero_bias, grid=(rows, cols),
                             reorient="none")
    return y.reshape(x.shape)
  if impl == "taps":
    return _taps_conv(x, kernel)
  return _grouped_conv(x, kernel)


def conv_reorient_kernel(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, grid: Grid, reorient: str
                         ) -> jax.Array:
  """`pallas_kernels.srem.ops.conv_reorient` (x [N, T, D], kernel [k, k, D], bias [D]; split over the active
  mesh's batch axes); off the GPU it runs in Pallas' interpreter (slow: for tests)."""
  return srem_ops.conv_reorient(x, kernel, bias, grid=grid, reorient=reorient,
                                interpret=jax.default_backend() not in _GPU_PLATFORMS)
