"""One model cell compiled afresh several times: how much its speed varies, and what the compiler chose.

Run on the GPU machine::

  python -m benchmarks.compile_variance --cell "DiG-S/2:256:bf16" --compiles 4 \\
      [--variant "autotune0=--xla_gpu_autotune_level=0" ...] [--out_dir DIR]

Why: in session 14 (H200; benchmarks/NOTES.md) the same DiG-S/2 256 px training step, each time compiled in a
fresh process without the compilation cache, trained at 3621, 2453 and 2488 img/s (sampling forward 12357,
6653, 6769) while DiT-S/2 stayed within 2 %. XLA:GPU autotunes while compiling, so the suspect is its
choices; this script settles it. Each compilation is a `model_sweep` worker (same step, same timing) in its
own process, without the persistent cache, that also writes its optimised modules (training step and
forward). Per variant (the caller's XLA_FLAGS as "default", plus each ``--variant NAME=FLAGS`` appended to
them, e.g. a flag that turns autotuning off or loads saved autotune results) the compilations run in rounds
whose order reverses every other round, as `model_sweep --repeats` does. At the end it prints, per variant,
training and forward images/s (median, min, max), and for the default variant the compiler's choices that
differ between its fastest and slowest compilation (`hlo_decisions.compare`, training step and forward,
largest results first). Only those two compilations' modules are kept; the result
(``compile_variance_<card>.json``) holds every run and both comparisons. Nothing here changes the model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from benchmarks import hlo_decisions, model_sweep
from benchmarks.bench_common import card_slug

DEFAULT = "default"
MAX_LISTED = 200  # differing instructions kept per comparison in the JSON


def parse_variants(specs: list[str]) -> dict[str, str]:
  """["autotune0=--xla_gpu_autotune_level=0"] -> {"default": "", "autotune0": "--xla_gpu_autotune_level=0"}."""
  variants = {DEFAULT: ""}
  for spec in specs:
    name, sep, flags = spec.partition("=")
    if not sep or not name or not flags.strip() or not name.replace("_", "").isalnum():
      raise SystemExit(f"--variant wants NAME=XLA_FLAGS (NAME letters, digits, _); got {spec!r}")
    if name in variants:
      raise SystemExit(f"--variant {name!r} given twice (or named {DEFAULT!r}, which is the caller's flags)")
    variants[name] = flags.strip()
  return variants


def run_order(variants: list[str], compiles: int) -> list[tuple[int, str]]:
  """(round, variant): every variant once per round, the order reversed every other round (drift)."""
  return [(i, v) for i in range(compiles) for v in (variants if i % 2 == 0 else variants[::-1])]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Median / min / max of training and forward images/s over a variant's runs that finished."""
  ok = [r for r in runs if r.get("status") == "ok"]
  out: dict[str, Any] = {"runs": len(runs), "ok": len(ok)}
  for key in ("train_images_per_s", "forward_images_per_s"):
    values = [r[key] for r in ok]
    if values:
      out[key] = dict(median=statistics.median(values), min=min(values), max=max(values), values=values)
  return out


def compare_extremes(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
  """The compiler's choices in the fastest vs the slowest finished run (by training images/s)."""
  ok = [r for r in runs if r.get("status") == "ok" and r.get("hlo_files")]
  if len(ok) < 2:
    return None
  fast = max(ok, key=lambda r: r["train_images_per_s"])
  slow = min(ok, key=lambda r: r["train_images_per_s"])
  out: dict[str, Any] = dict(fast_round=fast["round"], slow_round=slow["round"],
                             train_ratio=fast["train_images_per_s"] / slow["train_images_per_s"])
  for which in sorted(fast["hlo_files"].keys() & slow["hlo_files"].keys()):
    result = hlo_decisions.compare(
        hlo_decisions.decisions(hlo_decisions.read_text(fast["hlo_files"][which])),
        hlo_decisions.decisions(hlo_decisions.read_text(slow["hlo_files"][which])))
    out[which] = result
  return out


def _prune_modules(runs: list[dict[str, Any]], keep_rounds: set[int]) -> None:
  """Deletes the modules of every run but the kept ones (the device returns at most 8 files)."""
  for r in runs:
    if r.get("round") not in keep_rounds:
      for path in r.pop("hlo_files", {}).values():
        if os.path.exists(path):
          os.remove(path)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cell", default="DiG-S/2:256:bf16", help="one cell, `model_sweep --extra` syntax")
  parser.add_argument("--compiles", type=int, default=4, help="fresh compilations per variant")
  parser.add_argument("--variant", action="append", default=[], help="NAME=XLA_FLAGS appended to the caller's")
  parser.add_argument("--out_dir", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__),
                                                                                  "results"))
  parser.add_argument("--steps", type=int, default=5, help="minimum timed steps per run")
  parser.add_argument("--cell_timeout_s", type=float, default=240.0)
  parser.add_argument("--deadline_s", type=float, default=540.0, help="start no run after this many seconds")
  parser.add_argument("--tag", default="", help="suffix of the output file name")
  args = parser.parse_args(argv)
  cells = model_sweep.extra_cells(args.cell)
  if len(cells) != 1:
    raise SystemExit(f"--cell wants exactly one cell; got {len(cells)} from {args.cell!r}")
  if args.compiles < 2:
    raise SystemExit(f"--compiles must be >= 2 (a spread needs two runs); got {args.compiles}")
  variants = parse_variants(args.variant)
  start = time.time()
  os.makedirs(args.out_dir, exist_ok=True)
  env = model_sweep.environment()
  stem = os.path.join(args.out_dir, f"compile_variance_{card_slug(env['device_kind'])}"
                      f"{'_' + args.tag if args.tag else ''}")
  base_flags = os.environ.get("XLA_FLAGS", "")
  worker_args = argparse.Namespace(steps=args.steps, cache_dir="")  # no persistent cache: compile afresh
  runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
  log_lines = [f"{env}\ncell {cells[0]['label']} {cells[0]['px']} px B{cells[0]['batch']} "
               f"{cells[0]['precision']}; XLA_FLAGS={base_flags!r}; variants {variants}"]
  print(log_lines[0], flush=True)
  try:
    for round_index, variant in run_order(list(variants), args.compiles):
      if time.time() - start > args.deadline_s:
        runs[variant].append(dict(status="skipped", round=round_index, error="deadline"))
        continue
      spec = dict(cells[0], hlo_prefix=f"{stem}_{variant}_r{round_index}")
      os.environ["XLA_FLAGS"] = f"{base_flags} {variants[variant]}".strip()  # `launch` copies os.environ
      result = dict(model_sweep.launch(spec, "run", worker_args, args.cell_timeout_s), round=round_index)
      runs[variant].append(result)
      line = (f"[{time.time() - start:5.0f}s] {variant:12s} round {round_index}: "
              f"{model_sweep.fmt_cell(result)}  compile {result.get('train_compile_s', 0):.0f} s")
      print(line, flush=True)
      log_lines.append(line)
  finally:
    os.environ["XLA_FLAGS"] = base_flags
  default = compare_extremes(runs[DEFAULT])
  keep = {default["fast_round"], default["slow_round"]} if default else set()
  _prune_modules(runs[DEFAULT], keep)
  for variant in variants:
    if variant != DEFAULT:
      _prune_modules(runs[variant], set())
  summary = {v: summarize(r) for v, r in runs.items()}
  first_summary_line = len(log_lines)
  for v, s in summary.items():
    cols = [f"{key.split('_')[0]} {s[key]['median']:.1f} [{s[key]['min']:.1f}, {s[key]['max']:.1f}]"
            for key in ("train_images_per_s", "forward_images_per_s") if key in s]
    log_lines.append(f"{v:12s} {s['ok']}/{s['runs']} ok  " + "  ".join(cols))
  if default:
    log_lines.append(f"default: fastest (round {default['fast_round']}) / slowest (round "
                     f"{default['slow_round']}) = {default['train_ratio']:.2f}x in training")
    for which in ("train", "forward"):
      if which in default:
        log_lines.append(f"-- {which}: fastest -> slowest\n" + hlo_decisions.format_comparison(
            default[which], ("fastest", "slowest"), top=25))
        default[which]["changed"] = default[which]["changed"][:MAX_LISTED]
  print("\n".join(log_lines[first_summary_line:]), flush=True)
  with open(stem + ".json", "w", encoding="utf-8") as f:
    json.dump(dict(environment=env, cell=cells[0], xla_flags=base_flags, variants=variants, runs=runs,
                   summary=summary, default_fastest_vs_slowest=default), f, indent=1)
  with open(stem + ".log", "w", encoding="utf-8") as f:
    f.write("\n".join(log_lines) + "\n")


if __name__ == "__main__":
  main()
