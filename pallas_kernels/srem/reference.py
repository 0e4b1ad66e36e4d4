"""SREM's depthwise conv followed by the scan-order change in plain XLA: what the GPU kernel is tested against.

DiG (dig_spec.md §2.4) runs, after every block, a k x k depthwise conv with bias on the tokens viewed as the
block's (rows, cols) grid, and then reorients the token sequence for the next block. A reorientation is one of

- "none": the order is kept;
- "flip": the sequence is reversed (the grid rotated by 180 degrees);
- "flip_transpose": reversed, then viewed as its (rows, cols) grid, transposed and flattened again; the next
  grid is (cols, rows).

Tokens are [N, T, D] with T = rows * cols in the block's raster order. `source_positions` says, for every
output position j, which position of the conv's output lands there; the GPU kernel computes the same map
in-kernel (`gpu._source_position`), and the tests check both against the model's own reorientation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

REORIENTATIONS = ("none", "flip", "flip_transpose")
Grid = tuple[int, int]


def check_reorientation(reorient: str) -> None:
  if reorient not in REORIENTATIONS:
    raise ValueError(f"unknown reorientation {reorient!r}; use one of {REORIENTATIONS}")


def next_grid(grid: Grid, reorient: str) -> Grid:
  """The (rows, cols) grid the reoriented tokens lie on."""
  check_reorientation(reorient)
  return (grid[1], grid[0]) if reorient == "flip_transpose" else tuple(grid)


def source_positions(grid: Grid, reorient: str) -> np.ndarray:
  """s with out[:, j] = y[:, s[j]] for the reorientation of tokens y on `grid` (int array of length T)."""
  check_reorientation(reorient)
  rows, cols = grid
  positions = np.arange(rows * cols)
  if reorient == "none":
    return positions
  flipped = positions[::-1]
  if reorient == "flip":
    return flipped
  return flipped.reshape(rows, cols).T.reshape(-1)


def conv_reorient(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, grid: Grid, reorient: str
                  ) -> jax.Array:
  """Depthwise "same" conv (stride 1, odd k) with bias of tokens x [N, T, D] on `grid`, then reoriented.

  kernel [k, k, D] (the model's HWIO [k, k, 1, D] with the unit axis dropped), bias [D]. The conv accumulates
  in float32 and its result, bias added, is cast to x's dtype. Returns [N, T, D] in the new order.
  """
  n, t, d = x.shape
  rows, cols = grid
  if rows * cols != t:
    raise ValueError(f"grid {tuple(grid)} does not hold {t} tokens")
  k = kernel.shape[0]
  pad = k // 2
  y = jax.lax.conv_general_dilated(
      x.reshape(n, rows, cols, d).astype(jnp.float32), kernel.reshape(k, k, 1, d).astype(jnp.float32),
      window_strides=(1, 1), padding=((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=d, precision=jax.lax.Precision.HIGHEST)
  y = (y + bias.astype(jnp.float32)).astype(x.dtype).reshape(n, t, d)
  order = source_positions(grid, reorient)
  if np.array_equal(order, np.arange(t)):
    return y
  return jnp.take(y, jnp.asarray(order), axis=1)
