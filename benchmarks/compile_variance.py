"""Model cells compiled afresh several times: how much their speed varies, and what the compiler chose.

Run on the GPU machine::

  python -m benchmarks.compile_variance --cells "DiG-S/2:256:bf16,DiT-S/2:256:bf16:attention=cudnn" \\
      --compiles 4 [--variant "notune=--xla_gpu_autotune_level=0" ...] [--out_dir DIR]

Why: in session 14 (H200; benchmarks/NOTES.md) the same DiG-S/2 256 px training step, each time compiled in a
fresh process without the compilation cache, trained at 3621, 2453 and 2488 img/s (sampling forward 12357,
6653, 6769) while DiT-S/2 stayed within 2 %. XLA:GPU autotunes while compiling, so the suspect is its
choices; this script settles it, and compares cells under XLA flags with that noise in view. Each
compilation is a `model_sweep` worker (same step, same timing) in its own process, without the persistent
cache, that also writes its optimised modules (training step and forward). Per cell and variant (the
caller's XLA_FLAGS as "default", plus each ``--variant NAME=FLAGS`` appended to them, e.g. a flag that turns
autotuning off or loads saved autotune results) the compilations run in rounds whose order reverses every
other round, as `model_sweep --repeats` does. At the end it prints, per cell and variant, training and
forward images/s (median, min, max), per variant the first cell's median over each other cell's, and, for
each cell whose default fastest and slowest compilation differ by ``--keep_spread`` or more, the compiler's
choices that differ between those two (`hlo_decisions.compare`, training step and forward, largest results
first). Only those two compilations' modules are kept; the result (``compile_variance_<card>.json``) holds
every run and the comparisons. Nothing here changes the model.
"""
from __future__ import annotations

import argparse
import glob
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
  """["notune=--xla_gpu_autotune_level=0"] -> {"default": "", "notune": "--xla_gpu_autotune_level=0"}."""
  variants = {DEFAULT: ""}
  for spec in specs:
    name, sep, flags = spec.partition("=")
    if not sep or not name or not flags.strip() or not name.replace("_", "").isalnum():
      raise SystemExit(f"--variant wants NAME=XLA_FLAGS (NAME letters, digits, _); got {spec!r}")
    if name in variants:
      raise SystemExit(f"--variant {name!r} given twice (or named {DEFAULT!r}, which is the caller's flags)")
    variants[name] = flags.strip()
  return variants


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
  """Deletes the modules of every run but the kept ones (the device returns at most 8 files), also those a
  crashed or timed-out worker wrote before it ended (found by the run's `hlo_prefix`)."""
  for r in runs:
    if r.get("round") not in keep_rounds:
      r.pop("hlo_files", None)
      if r.get("hlo_prefix"):
        for path in glob.glob(glob.escape(r["hlo_prefix"]) + "_*.txt.gz"):
          os.remove(path)


def _summary_lines(groups: list[dict[str, Any]], variants: dict[str, str]) -> list[str]:
  """Per cell and variant the spread; per variant the first cell's median over each other cell's."""
  lines = []
  for g in groups:
    s = g["summary"]
    cols = [f"{key.split('_')[0]} {s[key]['median']:.1f} [{s[key]['min']:.1f}, {s[key]['max']:.1f}]"
            for key in ("train_images_per_s", "forward_images_per_s") if key in s]
    lines.append(f"{g['label']:34s} {g['variant']:12s} {s['ok']}/{s['runs']} ok  " + "  ".join(cols))
  first = groups[0]["label"]
  for variant in variants:
    medians = {g["label"]: g["summary"]["train_images_per_s"]["median"] for g in groups
               if g["variant"] == variant and "train_images_per_s" in g["summary"]}
    for label, median in medians.items():
      if label != first and first in medians:
        lines.append(f"{variant:12s} training, median {first} / {label}: {medians[first] / median:.3f}x")
  return lines


def _extremes_lines(group: dict[str, Any]) -> list[str]:
  extremes = group["fastest_vs_slowest"]
  lines = [f"{group['label']} ({group['variant']}): fastest (round {extremes['fast_round']}) / slowest "
           f"(round {extremes['slow_round']}) = {extremes['train_ratio']:.2f}x in training"]
  for which in ("train", "forward"):
    if which in extremes:
      lines.append(f"-- {which}: fastest -> slowest\n" + hlo_decisions.format_comparison(
          extremes[which], ("fastest", "slowest"), top=25))
      extremes[which]["changed"] = extremes[which]["changed"][:MAX_LISTED]
  return lines


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cells", default="DiG-S/2:256:bf16",
                      help="comma-separated cells, `model_sweep --extra` syntax; ratios are to the first")
  parser.add_argument("--compiles", type=int, default=4, help="fresh compilations per cell and variant")
  parser.add_argument("--variant", action="append", default=[],
                      help="NAME=XLA_FLAGS appended to the caller's XLA_FLAGS (repeatable)")
  parser.add_argument("--keep_spread", type=float, default=1.1,
                      help="keep (and compare) the modules of a cell's default fastest and slowest run "
                           "when they differ by at least this factor; 0: always")
  parser.add_argument("--out_dir", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__),
                                                                                  "results"))
  parser.add_argument("--steps", type=int, default=5, help="minimum timed steps per run")
  parser.add_argument("--cell_timeout_s", type=float, default=240.0)
  parser.add_argument("--deadline_s", type=float, default=540.0, help="start no run after this many seconds")
  parser.add_argument("--tag", default="", help="suffix of the output file name")
  args = parser.parse_args(argv)
  cells = model_sweep.extra_cells(args.cells)
  if not cells:
    raise SystemExit(f"--cells names no cell: {args.cells!r}")
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
  groups = [dict(cell=c, label=f"{c['label']} {c['px']} {c['precision']}", variant=v, runs=[])
            for c in cells for v in variants]
  log_lines = [f"{env}\ncells {[g['label'] for g in groups[::len(variants)]]}; XLA_FLAGS={base_flags!r}; "
               f"variants {variants}"]
  print(log_lines[0], flush=True)
  # Rounds of every (cell, variant), the order reversed every other round (drift), as `--repeats` runs them.
  for round_index, index in model_sweep.run_order(list(range(len(groups))), args.compiles):
    group = groups[index]
    if time.time() - start > args.deadline_s:
      group["runs"].append(dict(status="skipped", round=round_index, error="deadline"))
      continue
    prefix = f"{stem}_c{index // len(variants)}_{group['variant']}_r{round_index}"
    result = dict(model_sweep.launch(dict(group["cell"], hlo_prefix=prefix), "run", worker_args,
                                     args.cell_timeout_s,
                                     xla_flags=f"{base_flags} {variants[group['variant']]}".strip()),
                  round=round_index)
    group["runs"].append(result)
    line = (f"[{time.time() - start:5.0f}s] {group['label']:34s} {group['variant']:12s} "
            f"round {round_index}: {model_sweep.fmt_cell(result)}  "
            f"compile {result.get('train_compile_s', 0):.0f} s")
    print(line, flush=True)
    log_lines.append(line)
  first_summary_line = len(log_lines)
  for group in groups:
    group["summary"] = summarize(group["runs"])
    extremes = compare_extremes(group["runs"]) if group["variant"] == DEFAULT else None
    if extremes and extremes["train_ratio"] < args.keep_spread:
      extremes = None
    group["fastest_vs_slowest"] = extremes
    _prune_modules(group["runs"], {extremes["fast_round"], extremes["slow_round"]} if extremes else set())
  log_lines += _summary_lines(groups, variants)
  for group in groups:
    if group["fastest_vs_slowest"]:
      log_lines += _extremes_lines(group)
  print("\n".join(log_lines[first_summary_line:]), flush=True)
  with open(stem + ".json", "w", encoding="utf-8") as f:
    json.dump(dict(environment=env, xla_flags=base_flags, variants=variants, groups=groups), f, indent=1)
  with open(stem + ".log", "w", encoding="utf-8") as f:
    f.write("\n".join(log_lines) + "\n")


if __name__ == "__main__":
  main()
