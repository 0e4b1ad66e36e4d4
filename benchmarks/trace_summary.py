"""Per-op GPU time of a jitted training step from a `jax.profiler` trace (`model_sweep --profile`).

Why a hand-rolled parser: the profiler writes a Chrome-trace ``*.trace.json.gz`` next to its XPlane file,
which plain Python can read on the GPU machine, so the per-op table comes back as text instead of a trace
folder (the device tool returns at most 8 files, none nested deeper than two folders).

Kernel events of the GPU "Stream" lines are summed per HLO instruction (``args.hlo_op``, else the kernel
name) and mapped, through the compiled module's text, to the JAX name stack of the instruction's metadata. The
models wrap their parts in `jax.named_scope` (adaln, norm_modulate, gla_proj, gla_gate, gla_op, gla_out, mlp,
attention, dwconv, reorient), so each op falls into one of those categories; the rest is "other" (embedding,
loss, optimizer, EMA, metrics). XLA's command buffers (CUDA graphs) hide the ops inside them (the trace then
shows ``command_buffer_<n>`` events only, all "other"), so `main` turns them off for its workers
(``--xla_gpu_enable_command_buffer=``, `profile_xla_flags`) unless XLA_FLAGS already sets that flag; the
profiled step then runs a little slower than the timed cells (session 13, H100: ~2 % at 256 px).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import re
from typing import Any

CATEGORIES = ("adaln", "norm_modulate", "gla_proj", "gla_gate", "gla_op", "gla_out", "mlp", "attention",
              "dwconv", "reorient", "optimizer")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> metadata op_name (the JAX name stack), for every instruction that has one."""
  names = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      op = _OP_NAME.search(m.group(2))
      if op:
        names[m.group(1)] = op.group(1)
  return names


_SCOPE = re.compile(r"(?:^|[/(])(" + "|".join(CATEGORIES) + r")(?=[/)]|$)")


def category(op_name: str) -> str:
  """The innermost model scope in a JAX name stack such as "jit(f)/transpose(jvp(dwconv))/mul"."""
  found = _SCOPE.findall(op_name)
  if found:
    return found[-1]
  if "dot_product_attention" in op_name or "cudnn" in op_name:
    return "attention"
  if "adam" in op_name or "apply_updates" in op_name:
    return "optimizer"
  return "other"


def _key_variants(name: str) -> list[str]:
  return [name, name.replace("_", "."), re.sub(r"_(\d+)$", r".\1", name)]


def summarize(trace_dir: str, hlo_text: str, steps: int, top: int = 45) -> dict[str, Any]:
  """{"total_ms", "by_category_ms", "top_ops": [(op, ms, calls, op_name)], "threads"} per training step."""
  paths = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))
  if not paths:
    return {"error": f"no trace under {trace_dir}"}
  with gzip.open(paths[-1], "rb") as f:
    events = json.load(f)["traceEvents"]
  process = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  gpu_pids = {pid for pid, name in process.items() if "GPU" in name or "gpu" in name}
  per_thread: dict[str, float] = collections.Counter()
  per_op: dict[str, float] = collections.Counter()
  calls: dict[str, int] = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
      continue
    tname = thread.get((e["pid"], e.get("tid")), str(e.get("tid")))
    per_thread[f"{process[e['pid']]} | {tname}"] += e.get("dur", 0.0)
    if not tname.lower().startswith("stream"):
      continue
    args = e.get("args", {})
    key = args.get("hlo_op") or e.get("name", "?")
    per_op[key] += e.get("dur", 0.0)
    calls[key] += 1
  names = hlo_op_names(hlo_text)

  def op_name(key: str) -> str:
    for variant in _key_variants(key):
      if variant in names:
        return names[variant]
    return ""

  categories = {key: category(op_name(key)) for key in per_op}
  by_cat: dict[str, float] = collections.Counter()
  kernels_by_cat: dict[str, int] = collections.Counter()
  for key, us in per_op.items():
    by_cat[categories[key]] += us
    kernels_by_cat[categories[key]] += calls[key]
  scale = 1e-3 / steps  # us over `steps` steps -> ms per step
  ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
  other = sorted(((k, v) for k, v in per_op.items() if categories[k] == "other"), key=lambda kv: -kv[1])
  return {
      "total_ms": sum(per_op.values()) * scale,
      "by_category_ms": {k: v * scale for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
      "kernels_per_step_by_category": {k: v // steps for k, v in kernels_by_cat.items()},
      "top_ops": [(k, v * scale, calls[k] // steps, op_name(k)[-140:]) for k, v in ranked],
      "top_other_ops": [(k, v * scale, calls[k] // steps, op_name(k)[-140:]) for k, v in other[:top]],
      "threads": {k: v * scale for k, v in sorted(per_thread.items(), key=lambda kv: -kv[1])[:12]},
  }


def format_summary(label: str, summary: dict[str, Any]) -> str:
  if "error" in summary:
    return f"== {label}: {summary['error']}\n"
  lines = [f"== {label}: GPU kernel time {summary['total_ms']:.3f} ms / step"]
  lines.append("   by category: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["by_category_ms"].items()))
  lines.append("   kernels per step: " + ", ".join(
      f"{k} {v}" for k, v in summary.get("kernels_per_step_by_category", {}).items()))
  lines.append("   threads: " + "; ".join(f"{k}: {v:.2f}" for k, v in summary["threads"].items()))
  for title, key in (("top ops", "top_ops"), ("top ops outside the model scopes", "top_other_ops")):
    lines.append(f"   -- {title}")
    for op, ms, n, name in summary.get(key, []):
      lines.append(f"   {ms:8.3f} ms  x{n:<4d} {op[:48]:48s} {name}")
  return "\n".join(lines) + "\n"


COMMAND_BUFFERS_OFF = "--xla_gpu_enable_command_buffer="


def profile_xla_flags(xla_flags: str) -> str:
  """XLA_FLAGS for profiled workers: command buffers off, unless the flags already choose about them."""
  if "--xla_gpu_enable_command_buffer" in xla_flags:
    return xla_flags
  return f"{xla_flags} {COMMAND_BUFFERS_OFF}".strip()


def main(cells: list[dict[str, Any]], args: Any) -> None:
  """`model_sweep --profile --extra=...`: trace each cell in its own worker and write profile_<card>.txt."""
  import os

  os.environ["XLA_FLAGS"] = profile_xla_flags(os.environ.get("XLA_FLAGS", ""))  # the workers inherit it
  from benchmarks import model_sweep
  from benchmarks.bench_common import card_slug
  env = model_sweep.environment()
  card = card_slug(env["device_kind"])
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, f"profile_{card}{args.tag}.txt")
  text = [f"{env}\nXLA_FLAGS={os.environ.get('XLA_FLAGS', '')}\n"]
  if args.jobs > 0:
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
      list(pool.map(lambda c: model_sweep.launch(c, "compile", args, args.cell_timeout_s + 60), cells))
  for spec in cells:
    result = model_sweep.launch(spec, "profile", args, args.cell_timeout_s)
    head = f"{spec['label']} {spec['px']}px B{spec['batch']} {spec['precision']}"
    if result["status"] != "ok":
      text.append(f"== {head}: {result['status']} {result.get('error', '')[:800]}\n")
    else:
      head += f" (step {result['train_step_s'] * 1e3:.2f} ms wall)"
      text.append(format_summary(head, result.get("profile", {"error": "no profile"})))
    print(text[-1], flush=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(text))
