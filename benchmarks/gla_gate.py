"""The GLA op with DiG's low-rank forget gate: XLA-formed gate vs the fused gate kernels, side by side.

Run on the GPU machine: ``python -m benchmarks.gla_gate [--shapes "32,256,6,32,64,384,16;..."] [--out DIR]``.

Both paths start from the same inputs, q, k, v [B, T, H, K|V] (bf16) and the gate's x [B, T, D] (bf16) with
its float32 parameters W_down [D, R], W_up [R, H*K], b [H*K], and end at the GLA output:
- ``xla_gate``: `gate.low_rank_log_gate` (two GEMMs and the log-sigmoid in XLA, as the model's Dense layers
  form it), then `gpu.gla` (XLA's chunk-local cumsum and the GLA kernels);
- ``fused_gate``: `gpu.gla_low_rank_gate` (z = x W_down by XLA, then the up-projection, log-sigmoid and
  cumsum in the `gpu_gate` kernels, and the same GLA kernels).
For each, the median time of back-to-back calls after warm-up (`bench_common.time_calls`, three rotating
input sets) of the forward and of forward + backward (gradients of all seven inputs), and the relative error
of the fused path's output and gradients against the XLA path's. Default shapes: DiG-S/2's per-layer shapes
in training at 256, 1024 and 1792 px (B 32 / 4 / 2 as in `model_sweep`). Prints a table and writes
``gla_gate_<card>.json``.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_common import (env_info, jax_sync, log, parse_shapes, rel_err, result_path,
                                     run_shapes, shapes_parser, time_calls)
from pallas_kernels.gla import gpu
from pallas_kernels.gla.gate import LowRankGate, low_rank_log_gate

DEFAULT_SHAPES = ((32, 256, 6, 32, 64, 384, 16), (4, 4096, 6, 32, 64, 384, 16),
                  (2, 12544, 6, 32, 64, 384, 16))


def make_inputs(seed: int, b, t, h, dk, dv, dim, rank) -> dict:
  rng = np.random.default_rng(seed)
  shapes = dict(q=(b, t, h, dk), k=(b, t, h, dk), v=(b, t, h, dv), x=(b, t, dim))
  arrays = {n: jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for n, s in shapes.items()}
  # Parameters near DiG's init scale; the bias spreads the gates over DiG's range (log-sigmoid / 16).
  arrays["w_down"] = jnp.asarray(rng.standard_normal((dim, rank)) * dim ** -0.5, jnp.float32)
  arrays["w_up"] = jnp.asarray(rng.standard_normal((rank, h * dk)) * rank ** -0.5, jnp.float32)
  arrays["b_up"] = jnp.asarray(rng.uniform(-2, 4, (h * dk,)), jnp.float32)
  return arrays


def _gate(a: dict) -> LowRankGate:
  return LowRankGate(a["x"], a["w_down"], a["w_up"], a["b_up"])


def paths(interpret: bool = False) -> dict:
  """The two compared paths (`interpret=True`: both through the Pallas interpreter, for CPU tests)."""
  return {
      "xla_gate": lambda a: gpu.gla(a["q"], a["k"], a["v"], low_rank_log_gate(_gate(a), a["q"].shape[2]),
                                    interpret=interpret),
      "fused_gate": lambda a: gpu.gla_low_rank_gate(a["q"], a["k"], a["v"], _gate(a), interpret=interpret),
  }


PATHS = paths()


def bench_shape(shape: tuple[int, ...]) -> dict:
  sets = [make_inputs(seed, *shape) for seed in range(3)]
  row: dict = dict(shape=dict(zip(("B", "T", "H", "K", "V", "D", "R"), shape)), ms={}, errors={})
  outputs = {}
  for name, path in PATHS.items():
    fwd = jax.jit(path)
    grads = jax.jit(jax.grad(lambda a, path=path: path(a).astype(jnp.float32).sum()))
    row["ms"][name] = dict(fwd=1e3 * time_calls(fwd, [(s,) for s in sets], jax_sync),
                           fwd_bwd=1e3 * time_calls(grads, [(s,) for s in sets], jax_sync))
    outputs[name] = (fwd(sets[0]), grads(sets[0]))
  (o_f, g_f), (o_x, g_x) = outputs["fused_gate"], outputs["xla_gate"]
  row["errors"] = dict(o=rel_err(o_f, o_x), **{f"d{n}": rel_err(g_f[n], g_x[n]) for n in g_x})
  log(json.dumps(row))
  return row


def print_table(rows: list[dict]) -> None:
  print(f"{'B, T, H, K/V, D, R':28s} | {'xla_gate fwd / fwd+bwd':>24s} | {'fused_gate':>17s} | speed-up "
        "fwd / fwd+bwd | max rel. error")
  for r in rows:
    s, x, f = r["shape"], r["ms"]["xla_gate"], r["ms"]["fused_gate"]
    name = f"{s['B']}, {s['T']}, {s['H']}, {s['K']}/{s['V']}, {s['D']}, {s['R']}"
    print(f"{name:28s} | {x['fwd']:10.3f} / {x['fwd_bwd']:9.3f} | {f['fwd']:7.3f} / {f['fwd_bwd']:7.3f} | "
          f"{x['fwd'] / f['fwd']:5.2f}x / {x['fwd_bwd'] / f['fwd_bwd']:5.2f}x   | "
          f"{max(r['errors'].values()):.1e}")


def main() -> None:
  parser = shapes_parser('"B,T,H,K,V,D,R;..." (default: DiG-S/2 at 256/1024/1792)')
  args = parser.parse_args()
  shapes = parse_shapes(args.shapes, DEFAULT_SHAPES)
  result = dict(env=env_info(), timings=[])
  path = result_path(args.out, "gla_gate", result["env"]["device"], args.tag)
  run_shapes(shapes, bench_shape, result, path, print_table)

if __name__ == "__main__":
  main()
