"""Plots a model-sweep JSON like the paper's teaser: log images/s and peak memory against resolution.

``python -m benchmarks.plot_model_sweep benchmarks/results/model_sweep_h100.json docs/model_sweep_h100.png``

One row per precision with cells at two or more sizes, two columns (training images/s on a log axis,
peak GiB); one line per model of the S/2 sweep, at the sweep's batch size for each resolution. Where the JSON
merges several runs (a "run" field per cell), each point comes from the first run of `RUN_PREFERENCE` that
has it.
Out-of-memory cells are marked at the top of the memory panel. A cell with a "suspect" field (a reason, set
by hand in a merged JSON, e.g. a cell timed while another process compiled on the same host) is drawn with a
hollow marker and its reason written under the row's title. Runs on CPU (matplotlib, Agg).
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# A merged JSON's runs, best first (see its "notes").
RUN_PREFERENCE = ("s5_fill_a", "s5_fill_b", "s4_stacked", "final", "h100-b", "h100-a", "fp32_a", "fp32_b",
                  "quick", "variants")
STYLE = {"DiG-S/2": ("tab:red", "o"), "DiT-S/2-xla": ("tab:blue", "s"), "DiT-S/2-cudnn": ("tab:green", "^")}


def suspect_reasons(cells: list[dict]) -> list[str]:
  """The distinct "suspect" reasons of finished cells, in first-seen order."""
  return list(dict.fromkeys(r["suspect"] for r in cells if r.get("suspect") and r["status"] == "ok"))


def main(json_path: str, png_path: str) -> None:
  with open(json_path, encoding="utf-8") as f:
    data = json.load(f)
  order = {run: i for i, run in enumerate(RUN_PREFERENCE)}
  chosen: dict[tuple, dict] = {}  # one cell per (model, size, precision, batch): the most preferred run's
  for r in sorted(data["results"], key=lambda r: order.get(r.get("run", "final"), len(order))):
    if r["label"] in STYLE and r["batch"] == data["batch_sizes"].get(str(r["px"]), r["batch"]):
      chosen.setdefault((r["label"], r["px"], r["precision"]), r)
  results = list(chosen.values())
  precisions = [p for p in ("bf16", "fp32")
                if len({r["px"] for r in results if r["precision"] == p}) >= 2]
  fig, axes = plt.subplots(len(precisions), 2, figsize=(11, 4 * len(precisions)), squeeze=False)
  device = data["environment"]["device_kind"]
  for row, precision in enumerate(precisions):
    ax_speed, ax_mem = axes[row]
    for label, (color, marker) in STYLE.items():
      cells = sorted((r for r in results if r["label"] == label and r["precision"] == precision),
                     key=lambda r: r["px"])
      ok = [r for r in cells if r["status"] == "ok"]
      if not cells:
        continue
      ax_speed.plot([r["px"] for r in ok], [r["train_images_per_s"] for r in ok], color=color, marker=marker,
                    label=label)
      ax_mem.plot([r["px"] for r in ok], [r["train_peak_bytes"] / 2**30 for r in ok], color=color,
                  marker=marker, label=label)
      for r in ok:
        if r.get("suspect"):
          for ax, value in ((ax_speed, r["train_images_per_s"]), (ax_mem, r["train_peak_bytes"] / 2**30)):
            ax.plot([r["px"]], [value], linestyle="none", marker=marker, markerfacecolor="white",
                    markeredgecolor=color, zorder=3)
      for r in cells:
        if r["status"] == "oom":
          ax_mem.annotate("OOM", (r["px"], 0.97), xycoords=("data", "axes fraction"), color=color,
                          ha="center", va="top", fontsize=8)
          ax_mem.plot([r["px"]], [0.9], marker="x", color=color, transform=ax_mem.get_xaxis_transform())
    ax_speed.set_yscale("log")
    ax_speed.set_ylabel("training images/s (log)")
    ax_mem.set_ylabel("peak memory (GiB)")
    for ax in (ax_speed, ax_mem):
      ax.set_xlabel("image resolution (px)")
      ax.set_xticks([256, 512, 768, 1024, 1280, 1536, 1792, 2048])
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=8)
    batches = ", ".join(f"{px}:{b}" for px, b in data.get("batch_sizes", {}).items())
    note = data.get("precision_notes", {}).get(precision, "")  # which code a merged JSON's row comes from
    reasons = suspect_reasons([r for r in results if r["precision"] == precision])
    if reasons:
      note = "; ".join(filter(None, [note, "hollow: " + "; ".join(reasons)]))
    ax_speed.set_title(f"{precision} training step, {device}\n(batch per size {batches})"
                       + (f"\n{note}" if note else ""), fontsize=9)
    ax_mem.set_title(f"{precision} peak device memory (train step)", fontsize=9)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
