"""Which algorithm XLA's autotuner picks for DiG's depthwise conv in fresh compilations, and what it costs.

Why (issue #5, session 15): DiG-S/2's 256 px training step, compiled afresh from the same code, came out
1.46-1.48x slower in some compilations (sessions 14-15, H200). `compile_variance` compared the optimised
modules of a fast and a slow program: all 24 cuDNN `convForward` calls of the depthwise conv (12 forward, 12
input gradients) ran cuDNN's legacy algorithm 5 in the fast program and algorithm 0 in the slow one, and the
sampling forward was 1.7x slower. This script isolates that conv: every run is a fresh process that compiles
only the conv (forward, and its forward + input and weight gradients as in training) at one shape, records
the cuDNN algorithms the compiler chose (`hlo_decisions`), the compiler's warnings and errors (stderr, e.g.
XLA's "Results mismatch between different convolution algorithms", which disqualifies an algorithm), and
times both programs. Variants (`--variants`, any subset):

- ``default``: `srem.depthwise_conv(impl="conv")` in bf16 (the model's GPU conv until session 15);
- ``level3``: the same with ``--xla_gpu_autotune_level=3`` (autotuning without checking the candidates'
  results against each other: a test of the hypothesis that the check disqualifies the fast algorithm);
- ``fp32``: the conv in float32 (another dtype, other candidates and tolerances);
- ``taps``: ``impl="taps"`` (forward and input gradient as fusions, no algorithm to pick).

The causal test (session 16, H100: algorithm 0 made DiG-S/2's 256 px training step 1.43-1.46x slower than
5, everything else equal): time a program that differs from another only in the conv's algorithm. Dump XLA's
autotuning results from a cell compiled with ``XLA_FLAGS=--xla_gpu_dump_autotune_results_to=PATH``
(`sweep_worker` keeps the training step's as ``PATH.train``), rewrite its conv entry (cuDNN algorithm 5) with
``--force_algorithm N --results PATH.train --out EDITED`` (`force_conv_algorithm`), and compile the same cell
with ``--xla_gpu_load_autotune_results_from=EDITED`` and, as the control, from the unedited file.

``python -m benchmarks.dwconv_autotune [--shapes "32,16,16,384;2,112,112,384"] [--runs 6] [--variants
default,level3,fp32,taps] [--out_dir DIR] [--tag T]`` prints a table per shape and variant (the algorithms
picked with their counts, forward and training ms median [min, max], runs with warnings) and writes
``dwconv_autotune_<card>[_tag].json``. Shapes are [N, H, W, D] token grids: 32,16,16,384 is DiG-S/2's 256 px
step at batch 32, 2,112,112,384 its 1792 px step at batch 2.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import time
from typing import Any

from benchmarks import worker_process

VARIANTS = {  # name -> (impl, dtype, extra XLA flags)
    "default": ("conv", "bfloat16", ""),
    "level3": ("conv", "bfloat16", "--xla_gpu_autotune_level=3"),
    "fp32": ("conv", "float32", ""),
    "taps": ("taps", "bfloat16", ""),
}


def _cudnn_algorithm(entry: str) -> int | None:
  """The cuDNN algorithm of one ``entries {`` block of XLA's autotune results, None if it is no cuDNN entry
  (proto3 text omits an ``algo_id`` of 0)."""
  if "backend: CUDNN" not in entry or "algorithm {" not in entry:
    return None
  found = re.search(r"\balgo_id: (\d+)", entry)
  return int(found.group(1)) if found else 0


def _entries(text: str) -> list[str]:
  """XLA's autotune results split before each top-level ``entries {`` block (the first piece is the header)."""
  return re.split(r"(?m)^(?=entries \{)", text)


def force_conv_algorithm(text: str, algo_id: int, from_algorithm: int = 5) -> tuple[str, int]:
  """XLA autotune results (text proto, as ``--xla_gpu_dump_autotune_results_to`` writes them on jaxlib
  0.11.2) with every cuDNN entry of algorithm `from_algorithm` set to `algo_id`; returns (text, entries
  changed). An entry is a top-level ``entries {`` block keyed by the instruction's HLO fingerprint only, so
  the op is not named: the depthwise conv's forward and input-gradient convolutions share one entry (algorithm
  5 on H100 and H200), the backward-filter conv has its own (16), and `from_algorithm` tells them apart."""
  entries = _entries(text)
  changed = 0
  for i, entry in enumerate(entries):
    if _cudnn_algorithm(entry) != from_algorithm:
      continue
    if re.search(r"\balgo_id: \d+", entry):
      entries[i] = re.sub(r"\balgo_id: \d+", f"algo_id: {algo_id}", entry, count=1)
    else:
      entries[i] = entry.replace("algorithm {", f"algorithm {{\n          algo_id: {algo_id}", 1)
    changed += 1
  return "".join(entries), changed


def _force_main(args: argparse.Namespace) -> None:
  with open(args.results, encoding="utf-8") as f:
    original = f.read()
  text, changed = force_conv_algorithm(original, args.force_algorithm, args.from_algorithm)
  if not changed:
    entries = _entries(original)
    found = sorted({a for a in map(_cudnn_algorithm, entries) if a is not None})
    raise SystemExit(f"{args.results}: no cuDNN entry of algorithm {args.from_algorithm} (entries: "
                     f"{sum(e.startswith('entries {') for e in entries)}, cuDNN algorithms: {found}); was it "
                     "dumped right after the training step's compilation (PATH.train)? --from_algorithm "
                     "picks another")
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"{changed} cuDNN entries of algorithm {args.from_algorithm} -> {args.force_algorithm}: {args.out}")


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
  """Compiles and times the conv of `spec` in this process (a fresh one: `launch`)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import hlo_decisions
  from benchmarks.bench_common import jax_sync, time_calls
  from dig_jax.models import srem

  impl, dtype_name, _ = VARIANTS[spec["variant"]]
  dtype = jnp.dtype(dtype_name)
  n, h, w, d = spec["shape"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, w, d)), dtype)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 1, d)) / 3, dtype)
  cotangent = jnp.asarray(rng.standard_normal((n, h, w, d)), dtype)

  def forward(x, kernel):
    return srem.depthwise_conv(x, kernel, impl=impl)

  def training(x, kernel):  # the conv's share of a training step: forward, input and weight gradients
    y, pullback = jax.vjp(forward, x, kernel)
    return y, *pullback(cotangent)

  out: dict[str, Any] = dict(spec, device=jax.devices()[0].device_kind)
  for name, fn in (("forward", forward), ("train", training)):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(x, kernel).compile()
    out[f"{name}_compile_s"] = time.perf_counter() - t0
    picks = [f"{dec.kind}: {dec.choice}" for dec in hlo_decisions.decisions(compiled.as_text()).values()
             if dec.kind.startswith("__cudnn")]
    out[f"{name}_algorithms"] = dict(collections.Counter(picks))
    out[f"{name}_ms"] = time_calls(compiled, [(x, kernel)], jax_sync) * 1e3
  return out


def launch(spec: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
  """One worker subprocess with the variant's XLA_FLAGS; a crash or timeout becomes an error result."""
  flags = " ".join(filter(None, (os.environ.get("XLA_FLAGS", ""), VARIANTS[spec["variant"]][2])))
  env = dict(os.environ, XLA_FLAGS=flags, PYTHONUNBUFFERED="1")
  run = worker_process.run_worker("benchmarks.dwconv_autotune", spec, [], env, timeout)
  if run.timed_out:
    return dict(spec, status="timeout", xla_log=[])
  log_lines = worker_process.xla_log_lines(run.stderr)
  if run.result is not None:
    return dict(run.result, status="ok", xla_log=log_lines)
  return dict(spec, status="crash", error=f"exit {run.returncode}: {run.stderr[-1500:]}", xla_log=log_lines)


def _spread(values: list[float]) -> str:
  if not values:
    return "-"
  return f"{statistics.median(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Per (shape, variant): how often each set of algorithms was picked, ms spreads, runs with warnings."""
  ok = [r for r in runs if r["status"] == "ok"]
  picks: collections.Counter = collections.Counter()
  for r in ok:
    picks[json.dumps(dict(forward=r["forward_algorithms"], train=r["train_algorithms"]), sort_keys=True)] += 1
  return dict(runs=len(runs), ok=len(ok), algorithm_sets={k: v for k, v in picks.most_common()},
              forward_ms=[r["forward_ms"] for r in ok], train_ms=[r["train_ms"] for r in ok],
              runs_with_log=sum(1 for r in runs if r["xla_log"]),
              mismatch_runs=sum(1 for r in runs if any("mismatch" in line.lower() for line in r["xla_log"])))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="32,16,16,384", help='"N,H,W,D;..." token grids')
  parser.add_argument("--runs", type=int, default=6, help="fresh compilations per shape and variant")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--out_dir", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__),
                                                                                "results"))
  parser.add_argument("--tag", default="")
  parser.add_argument("--deadline_s", type=float, default=1e9, help="start no run after this many seconds")
  parser.add_argument("--force_algorithm", type=int, default=None,
                      help="rewrite --results' conv entries to this algorithm into --out, and exit")
  parser.add_argument("--from_algorithm", type=int, default=5,
                      help="--force_algorithm: rewrite the cuDNN entries of this algorithm (the conv's, 5)")
  parser.add_argument("--results", default="", help="--force_algorithm: XLA autotune results (text proto)")
  parser.add_argument("--out", default="", help="--force_algorithm: where the edited results go")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.force_algorithm is not None:
    if not args.results or not args.out:
      raise SystemExit("--force_algorithm needs --results IN and --out OUT")
    _force_main(args)
    return
  if args.worker:
    worker_process.emit_result(run_worker(json.loads(args.worker)))
    return
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown or not variants:
    raise SystemExit(f"--variants {args.variants!r}: unknown {unknown}; choose from {sorted(VARIANTS)}")
  try:
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s.strip()]
  except ValueError:
    shapes = []
  if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
    raise SystemExit(f"--shapes {args.shapes!r}: expected 'N,H,W,D;...' with positive ints")

  start = time.time()
  runs: list[dict[str, Any]] = []
  for round_index in range(args.runs):  # rounds of every (shape, variant), so drift spreads over all
    for shape in shapes:
      for variant in variants:
        spec = dict(shape=list(shape), variant=variant, round=round_index)
        if time.time() - start > args.deadline_s:
          runs.append(dict(spec, status="skipped", xla_log=[]))
          continue
        result = launch(spec)
        runs.append(result)
        ms = (f"fwd {result['forward_ms']:.4f} ms  train {result['train_ms']:.4f} ms  "
              f"{result['train_algorithms']}" if result["status"] == "ok" else result["status"])
        print(f"[{time.time() - start:5.0f}s] {shape} {variant:8s} r{round_index}: {ms}"
              f"{'  LOG: ' + result['xla_log'][0] if result['xla_log'] else ''}", flush=True)

  device = next((r["device"] for r in runs if r.get("device")), "unknown")
  summary = []
  print(f"\n{device}: shape, variant | ok | forward ms median [min, max] | train ms | "
        "log/mismatch runs | picks")
  for shape in shapes:
    for variant in variants:
      s = summarize([r for r in runs if tuple(r["shape"]) == shape and r["variant"] == variant])
      summary.append(dict(shape=list(shape), variant=variant, **s))
      print(f"{str(shape):22s} {variant:8s} | {s['ok']}/{s['runs']} | {_spread(s['forward_ms'])} | "
            f"{_spread(s['train_ms'])} | {s['runs_with_log']}/{s['mismatch_runs']}")
      for picks, count in s["algorithm_sets"].items():
        print(f"{'':33s}{count}x {picks}")
  from benchmarks.bench_common import card_slug
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, f"dwconv_autotune_{card_slug(device)}{'_' + args.tag if args.tag else ''}"
                      ".json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dict(device=device, xla_flags=os.environ.get("XLA_FLAGS", ""), variants=VARIANTS,
                   summary=summary, runs=runs), f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
