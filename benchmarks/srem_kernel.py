"""SREM's conv + bias + reorientation: XLA (the model's "taps" and "conv" paths) vs the fused Pallas kernel.

Run on the GPU machine: ``python -m benchmarks.srem_kernel [--shapes "32,16,16,384,2;..."] [--out DIR]``.

A shape is N, rows, cols, D and the reorientation (0 none, 1 flip, 2 flip_transpose). Each path maps the same
bf16 tokens [N, T, D], kernel [3, 3, D] and bias [D] to the reoriented conv output:
- ``taps`` / ``conv``: `dig_jax.models.srem.conv_bias_reorient` with that impl (what `DepthwiseConv` runs:
  `depthwise_conv`, the bias added in bf16, then XLA's permutation);
- ``pallas``: `pallas_kernels.srem.gpu.conv_reorient` (one kernel forward, one backward).
For each, the median time of back-to-back calls after warm-up (`bench_common.time_calls`, three rotating
input sets) of the forward and of forward + backward (gradients of all three inputs), and the relative
error of every path's output and gradients against `reference.conv_reorient` in fp32. Default shapes:
DiG-S/2's per-block SREM in training at 256, 1024 and 1792 px (B 32 / 4 / 2 as in `model_sweep`), with the
transposing reorientation, and 256 px with the plain flip. Prints a table and writes
``srem_kernel_<card>.json``.

``--tile_sweep`` instead times the kernel's forward and backward tilings (`gpu.FORWARD_CONFIG`,
`gpu.BACKWARD_CONFIG`: largest token tile, channel tile, warps) as DiG runs them: 12 calls in a row (one per
block, the reorientation alternating flip / flip_transpose as in the model) forward + backward in one jitted
function, so that a call's time is the kernels' and not the dispatch; shapes N, rows, cols, D (the
reorientation field is ignored). Writes ``srem_kernel_tiles_<card>.json``.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_common import (env_info, jax_sync, log, parse_shapes, rel_err, result_path,
                                     run_shapes, shapes_parser, time_calls)
from dig_jax.models import srem
from pallas_kernels.srem import gpu, reference

DEFAULT_SHAPES = ((32, 16, 16, 384, 2), (32, 16, 16, 384, 1), (4, 64, 64, 384, 2), (2, 112, 112, 384, 2))
XLA_IMPLS = ("taps", "conv")


def _xla_path(impl: str, grid, reorient: str):
  return lambda x, kernel, bias: srem.conv_bias_reorient(x, kernel[:, :, None, :], bias, grid, reorient, impl)


def paths(grid, reorient: str, interpret: bool = False) -> dict:
  """The compared paths for one shape (`interpret=True`: the kernel through the Pallas interpreter, CPU)."""
  out = {impl: _xla_path(impl, grid, reorient) for impl in XLA_IMPLS}
  out["pallas"] = lambda x, w, b: gpu.conv_reorient(x, w, b, grid=grid, reorient=reorient,
                                                    interpret=interpret)
  return out


INTERPRET = False  # tests set it (CPU)


def make_inputs(seed: int, n: int, t: int, d: int) -> tuple:
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((n, t, d)), jnp.bfloat16),
          jnp.asarray(rng.standard_normal((3, 3, d)) / 3, jnp.bfloat16),
          jnp.asarray(rng.standard_normal((d,)), jnp.bfloat16))


def bench_shape(shape: tuple[int, ...]) -> dict:
  n, rows, cols, d, which = shape
  grid, reorient = (rows, cols), reference.REORIENTATIONS[which]
  sets = [make_inputs(seed, n, rows * cols, d) for seed in range(3)]
  row: dict = dict(shape=dict(N=n, rows=rows, cols=cols, D=d, reorient=reorient), ms={}, errors={})
  f32 = [a.astype(jnp.float32) for a in sets[0]]
  cotangent = make_inputs(9, n, rows * cols, d)[0].astype(jnp.float32)  # fixed: d loss / d out
  want = jax.value_and_grad(lambda *a: jnp.sum(reference.conv_reorient(*a, grid=grid, reorient=reorient)
                                                 * cotangent), argnums=(0, 1, 2))(*f32)
  for name, path in paths(grid, reorient, INTERPRET).items():
    fwd = jax.jit(path)
    loss = lambda x, w, b, path=path: jnp.sum(path(x, w, b).astype(jnp.float32) * cotangent)
    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    row["ms"][name] = dict(fwd=1e3 * time_calls(fwd, sets, jax_sync),
                           fwd_bwd=1e3 * time_calls(grads, sets, jax_sync))
    got = grads(*sets[0])
    row["errors"][name] = dict(out=rel_err(fwd(*sets[0]), reference.conv_reorient(
        *f32, grid=grid, reorient=reorient)), **{f"d{a}": rel_err(g, w) for a, g, w in zip(
            ("x", "kernel", "bias"), got[1], want[1])})
  log(json.dumps(row))
  return row


def print_table(rows: list[dict]) -> None:
  names = ("taps", "conv", "pallas")
  header = " | ".join(f"{n + ' fwd / fwd+bwd ms':>24s}" for n in names)
  print(f"{'N, rows x cols, D, reorient':34s} | {header} | pallas vs taps (fwd+bwd) | max rel. error")
  for r in rows:
    s, ms = r["shape"], r["ms"]
    name = f"{s['N']}, {s['rows']}x{s['cols']}, {s['D']}, {s['reorient']}"
    cells = " | ".join(f"{ms[n]['fwd']:11.4f} / {ms[n]['fwd_bwd']:10.4f}" for n in names)
    worst = max(v for e in r["errors"].values() for v in e.values())
    print(f"{name:34s} | {cells} | {ms['taps']['fwd_bwd'] / ms['pallas']['fwd_bwd']:23.2f}x | {worst:.1e}")


# --tile_sweep: (forward config, backward config) pairs; the first is the kernel's default since session 17,
# the second its first version's.
TILE_CONFIGS = (((64, 64, 4), (32, 64, 2)), ((128, 64, 4), (128, 64, 4)), ((128, 64, 4), (64, 64, 4)),
                ((128, 64, 4), (128, 32, 4)), ((128, 64, 4), (256, 32, 8)), ((128, 64, 4), (64, 32, 2)),
                ((128, 64, 4), (128, 64, 8)), ((128, 64, 4), (32, 64, 2)), ((64, 64, 4), (128, 64, 4)),
                ((128, 32, 4), (128, 64, 4)), ((256, 64, 8), (128, 64, 4)))


CHAIN_DEPTH = 12  # --tile_sweep: calls in a row (DiG-S/2's blocks); tests shorten it


def _block_chain(grid):
  """fwd+bwd of CHAIN_DEPTH conv_reorient calls in a row, grid and reorientation following DiG's blocks."""
  def loss(x, kernel, bias):
    g = grid
    for i in range(CHAIN_DEPTH):
      reorient = "flip_transpose" if i % 2 else "flip"
      x = gpu.conv_reorient(x, kernel, bias, grid=g, reorient=reorient, interpret=INTERPRET)
      g = reference.next_grid(g, reorient)
    return jnp.sum(x.astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def bench_tiles(shape: tuple[int, ...]) -> dict:
  n, rows, cols, d = shape[:4]
  sets = [make_inputs(seed, n, rows * cols, d) for seed in range(3)]
  row: dict = dict(shape=dict(N=n, rows=rows, cols=cols, D=d), ms_per_block={})
  default = (gpu.FORWARD_CONFIG, gpu.BACKWARD_CONFIG)
  try:
    for fwd_config, bwd_config in TILE_CONFIGS:
      gpu.FORWARD_CONFIG, gpu.BACKWARD_CONFIG = fwd_config, bwd_config
      name = f"fwd {fwd_config} bwd {bwd_config}"
      seconds = time_calls(_block_chain((rows, cols)), sets, jax_sync)
      row["ms_per_block"][name] = 1e3 * seconds / CHAIN_DEPTH
  finally:
    gpu.FORWARD_CONFIG, gpu.BACKWARD_CONFIG = default
  log(json.dumps(row))
  return row


def print_tiles(rows: list[dict]) -> None:
  for r in rows:
    s = r["shape"]
    print(f"{s['N']}, {s['rows']}x{s['cols']}, {s['D']}: fwd+bwd ms per block ({CHAIN_DEPTH} in a row)")
    for name, ms in sorted(r["ms_per_block"].items(), key=lambda kv: kv[1]):
      print(f"  {name:44s} {ms:.4f}")


def main() -> None:
  parser = shapes_parser('"N,rows,cols,D,reorient;..." (reorient 0 none, 1 flip, 2 flip_transpose)')
  parser.add_argument("--tile_sweep", action="store_true", help="time the kernel's tilings (see docstring)")
  args = parser.parse_args()
  shapes = parse_shapes(args.shapes, DEFAULT_SHAPES)
  result = dict(env=env_info(), timings=[])
  name = "srem_kernel_tiles" if args.tile_sweep else "srem_kernel"
  path = result_path(args.out, name, result["env"]["device"], args.tag)
  if args.tile_sweep:
    run_shapes(shapes, bench_tiles, result, path, print_tiles)
  else:
    run_shapes(shapes, bench_shape, result, path, print_table)


if __name__ == "__main__":
  main()
