"""The GLA forward on the GPU: Pallas-Triton kernels (`gpu_kernels`) against the Mosaic GPU kernels
(`pallas_kernels/gla/gpu_mosaic.py`), on the same inputs, in one run.

Run on the GPU machine: ``python -m benchmarks.gla_mosaic [--shapes "8,12544,6,32,64;..."] [--out DIR]
[--segments "1,2,4"] [--no_fallback]``.

For each shape (bf16, DiG's gates log-sigmoid(2 N(0, 1)) / 16), with G the chunk-local cumsum (XLA):
- ``state``: the state pass alone, Triton (`gpu._states`, tuned tiles and segments) vs Mosaic (the segments
  `gpu` runs it with, `gpu.mosaic_segments`);
- ``out``: the output pass alone, on the same [K, V] states (Triton's, joined when segmented);
- ``fwd``: state pass + output pass from G, Triton as the op runs it vs Mosaic with `gpu`'s segment count
  and each of ``--segments`` (``--no_fallback``: also Mosaic without the in-kernel level scheme, to measure
  what that costs; wrong for strong gates);
- ``op``: the op's forward from the raw log gate, `gpu.gla` with the Triton forward (XLA's cumsum, then the
  kernels) vs `gpu.gla` as tuned (``op_mosaic``: the Mosaic forward, whose state pass forms G from the log
  gate) and XLA's cumsum + the Mosaic forward from G with its best segment count
  (``op_mosaic_xla_cumsum``), and the op's Mosaic forward with each other of ``--segments``
  (``op_mosaic_s<n>``), against issue #4's floor (512 B per token-head at 32/64
  over the copy bandwidth measured in the same run);
median of back-to-back calls after warm-up (`bench_common.time_calls`, three rotating input sets), and each
output's relative error against the fp32 reference (`reference.chunked_gla` on the same bf16-rounded inputs,
HIGHEST precision). Prints a table and writes ``gla_mosaic_<card>.json``.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp

from benchmarks.bench_common import (copy_bandwidth, env_info, jax_sync, log, make_inputs, parse_shapes,
                                     rel_err, result_path, run_shapes, shapes_parser, time_calls)
from pallas_kernels.gla import gpu, gpu_mosaic, reference

DEFAULT_SHAPES = ((8, 12544, 6, 32, 64), (2, 12544, 6, 32, 64), (8, 4096, 6, 32, 64), (32, 256, 6, 32, 64),
                  (8, 12544, 6, 64, 64))
CHUNK = gpu_mosaic.CHUNK


def _config(q, v) -> gpu.KernelConfig:
  cfg = gpu.tuned_config(q.shape, v.shape, CHUNK, q.dtype)
  return dataclasses.replace(cfg, chunk_size=CHUNK, scale=float(q.shape[-1] ** -0.5))


def _states(k, v, g, cfg):
  hs = gpu._states(k, v, g, cfg)
  return hs.materialize() if isinstance(hs, gpu.SegmentedStates) else hs


def output_passes(cfg: gpu.KernelConfig) -> dict:
  """name -> f(q, k, v, g, hs) -> o: the two output passes on the same operands ([K, V] bf16 states)."""
  return {"triton": lambda q, k, v, g, hs: gpu._outputs(q, k, v, g, hs, cfg),
          "mosaic": lambda q, k, v, g, hs: gpu_mosaic.out_pass(q, k, v, g, hs, scale=cfg.scale)}


def forwards(cfg: gpu.KernelConfig, mosaic_segments: int, num_chunks: int, extra_segments: tuple[int, ...],
             no_fallback: bool = False) -> dict:
  """name -> f(q, k, v, g) -> o: the whole forward from G (state pass + output pass), Triton as the op runs
  it (tuned tiles, segments joined inside the output kernel) and Mosaic with `mosaic_segments` (and with each
  of `extra_segments` that divides the chunk count; `no_fallback`: also without the level scheme)."""
  tuned = mosaic_segments
  out = {"triton": lambda q, k, v, g: gpu._two_pass_forward(q, k, v, g, cfg)[0]}
  for s in dict.fromkeys((tuned,) + tuple(extra_segments)):
    if num_chunks % s == 0:
      out[f"mosaic_s{s}"] = lambda q, k, v, g, s=s: gpu_mosaic.forward(q, k, v, g, scale=cfg.scale,
                                                                          segments=s)
  if no_fallback:
    out[f"nofallback_s{tuned}"] = lambda q, k, v, g: gpu_mosaic.forward(
        q, k, v, g, scale=cfg.scale, segments=tuned, levels_fallback=False)
  return out


def out_pass_bytes(b, t, h, dk, dv) -> int:
  """Bytes the output pass must move: q, k, v, o (bf16), G (fp32), one bf16 K x V state per chunk."""
  return b * t * h * (2 * dk + 2 * dk + 2 * dv + 2 * dv + 4 * dk) + b * (t // CHUNK) * h * dk * dv * 2


def op_floor_bytes(b, t, h, dk, dv) -> int:
  """Issue #4's forward floor: q, k, v, o (bf16) and the cumulative gate (fp32) once each."""
  return b * t * h * (2 * (2 * dk + 2 * dv) + 4 * dk)


def bench_shape(shape: tuple[int, ...], bandwidth: float, extra_segments: tuple[int, ...],
                no_fallback: bool = False) -> dict:
  b, t, h, dk, dv = shape
  sets = []
  for seed in range(3):
    q, k, v, log_gate, _ = make_inputs(jax.random.key(seed), b, t, h, dk, dv, jnp.bfloat16)
    g = reference.chunk_local_cumsum(log_gate, CHUNK)
    sets.append((q, k, v, g, log_gate))
  cfg = _config(sets[0][0], sets[0][2])
  states = jax.jit(lambda q, k, v, g: _states(k, v, g, cfg))
  row: dict = dict(shape=dict(zip(("B", "T", "H", "K", "V"), shape)), ms={}, errors={},
                   out_floor_ms=1e3 * out_pass_bytes(*shape) / bandwidth,
                   op_floor_ms=1e3 * op_floor_bytes(*shape) / bandwidth,
                   segments=gpu.state_segments(cfg, t // CHUNK),
                   mosaic_segments=gpu.mosaic_segments(b * h, t // CHUNK))
  q, k, v, g, log_gate = sets[0]
  ref = jax.jit(lambda *a: reference.chunked_gla(*a, chunk_size=CHUNK, precision=jax.lax.Precision.HIGHEST))(
      *(x.astype(jnp.float32) for x in (q, k, v)), log_gate)
  hs_sets = [states(*s[:4]) for s in sets]
  err = lambda o: rel_err(o.astype(jnp.float32), ref)
  state_passes = {"triton": lambda q, k, v, g: gpu._states(k, v, g, cfg),
                  "mosaic": lambda q, k, v, g: gpu_mosaic.state_pass(k, v, g, row["mosaic_segments"])}
  for name, fn in state_passes.items():
    row["ms"][f"state_{name}"] = 1e3 * time_calls(jax.jit(fn), [s[:4] for s in sets], jax_sync)
  for name, out in output_passes(cfg).items():
    out_j = jax.jit(out)
    row["ms"][f"out_{name}"] = 1e3 * time_calls(out_j, [s[:4] + (hs,) for s, hs in zip(sets, hs_sets)],
                                                 jax_sync)
    row["errors"][f"out_{name}"] = err(out_j(*sets[0][:4], hs_sets[0]))
  for name, fwd in forwards(cfg, row["mosaic_segments"], t // CHUNK, extra_segments, no_fallback).items():
    fwd_j = jax.jit(fwd)
    row["ms"][f"fwd_{name}"] = 1e3 * time_calls(fwd_j, [s[:4] for s in sets], jax_sync)
    row["errors"][f"fwd_{name}"] = err(fwd_j(*sets[0][:4]))
  # The op's forward from the raw log gate (XLA's chunk cumsum included), as `gla_kernel.py` times `gpu.gla`.
  best = min((n for n in row["ms"] if n.startswith("fwd_mosaic")), key=row["ms"].get)  # with the fallback
  seg = int(best.split("_s")[-1])
  triton_cfg = dataclasses.replace(gpu.tuned_config(q.shape, v.shape, CHUNK, q.dtype),
                                   forward_backend="triton")
  ops = {"triton": jax.jit(lambda q, k, v, lg: gpu.gla(q, k, v, lg, chunk_size=CHUNK, config=triton_cfg)),
         "mosaic_xla_cumsum": jax.jit(lambda q, k, v, lg: gpu_mosaic.forward(
             q, k, v, gpu._gate_cumsum(lg, cfg), scale=cfg.scale, segments=seg)),
         "mosaic": jax.jit(lambda q, k, v, lg: gpu.gla(q, k, v, lg, chunk_size=CHUNK))}  # tuned: Mosaic
  for s_extra in extra_segments:     # the op's Mosaic forward (log-gate state pass) at other segment counts
    if (t // CHUNK) % s_extra == 0 and s_extra != row["mosaic_segments"]:
      ops[f"mosaic_s{s_extra}"] = jax.jit(lambda q, k, v, lg, s=s_extra: gpu_mosaic.forward(
          q, k, v, lg, scale=cfg.scale, segments=s, raw_gate=True))
  for name, op in ops.items():
    row["ms"][f"op_{name}"] = 1e3 * time_calls(op, [s[:3] + (s[4],) for s in sets], jax_sync)
    row["errors"][f"op_{name}"] = err(op(q, k, v, log_gate))
  row["op_mosaic_xla_cumsum_segments"] = seg
  log(json.dumps(row))
  return row


def print_table(rows: list[dict]) -> None:
  print(f"{'B, T, H, K/V':18s} | {'out: floor':>10s} {'triton':>7s} {'mosaic':>7s} | {'fwd: triton':>11s} "
        f"{'mosaic (segments)':>28s} | {'op: floor':>9s} {'triton':>7s} {'mosaic':>7s} {'x floor':>13s} | "
        "max err")
  for r in rows:
    s, ms = r["shape"], r["ms"]
    name = f"{s['B']}, {s['T']}, {s['H']}, {s['K']}/{s['V']}"
    mos = " ".join(f"{ms[n]:.3f}({n.split('_s')[-1]})" for n in ms if n.startswith("fwd_mosaic"))
    print(f"{name:18s} | {r['out_floor_ms']:10.3f} {ms['out_triton']:7.3f} {ms['out_mosaic']:7.3f} | "
          f"{ms['fwd_triton']:11.3f} {mos:>28s} | {r['op_floor_ms']:9.3f} {ms['op_triton']:7.3f} "
          f"{ms['op_mosaic']:7.3f} {ms['op_triton'] / r['op_floor_ms']:5.1f}/"
          f"{ms['op_mosaic'] / r['op_floor_ms']:4.1f}x"
          f"   | {max(r['errors'].values()):.1e}")
    op_segments = [f"{ms[n]:.3f}({n.split('_s')[-1]})" for n in ms if n.startswith("op_mosaic_s")]
    if op_segments:
      print(f"{'':18s}   op mosaic (segments): tuned {ms['op_mosaic']:.3f}({r['mosaic_segments']}) "
            + " ".join(op_segments))


def main() -> None:
  parser = shapes_parser('"B,T,H,K,V;..." (bf16; K 32/64, V 64)')
  parser.add_argument("--no_fallback", action="store_true", help="also the Mosaic forward without levels")
  parser.add_argument("--segments", default="1,2,4,8,16", help="extra segment counts for the Mosaic forward")
  args = parser.parse_args()
  shapes = parse_shapes(args.shapes, DEFAULT_SHAPES)
  result = dict(env=env_info(), copy_bandwidth=copy_bandwidth(), timings=[])
  log(f"copy bandwidth {result['copy_bandwidth'] / 1e12:.2f} TB/s")
  path = result_path(args.out, "gla_mosaic", result["env"]["device"], args.tag)
  extra = tuple(int(x) for x in args.segments.split(",") if x)
  run_shapes(shapes, lambda shape: bench_shape(shape, result["copy_bandwidth"], extra, args.no_fallback),
             result, path, print_table)


if __name__ == "__main__":
  main()
