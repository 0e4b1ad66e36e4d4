"""Resolution sweep of DiG against DiT (issue #5; the paper's teaser, dig_spec.md §5.4-5.5): speed, memory.

On the GPU machine: ``python -m benchmarks.model_sweep [--quick] [--out_dir=DIR] [--jobs=N] [--gpus=N]``.

Every cell is one (model, attention/GLA implementation, image size, batch, precision). A cell measures
- a full training step: ``dig_jax.train.train_step`` itself (forward, DiT's diffusion loss MSE + VB with
  learned sigma, backward, AdamW, EMA), jitted once with ``donate_argnums=(0,)`` as ``train.py`` does, after
  two warm-up steps; median of >= 5 timed steps, each synchronised with ``block_until_ready``;
  images/s = batch / time;
- peak device memory of the process after the training steps (``memory_stats()["peak_bytes_in_use"]``) and
  XLA's static memory analysis of the compiled step (arguments + temporaries);
- one sampling step's forward: a plain (no CFG) model call on the EMA parameters, batch as above, images/s.
Latent = image/8 with 4 channels, 1000 classes, learned sigma. Precision "bf16" = bf16 compute (fp32 master
weights, fp32 loss); "fp32" = fp32 compute with TF32 matmuls
(``jax.default_matmul_precision("tensorfloat32")``), what the paper trained with. cuDNN flash attention has
no fp32 mode: those cells are reported as n/a.

Each cell runs in a fresh subprocess (its side of the work: `sweep_worker.py`), so its peak memory is its own
and an out-of-memory error is reported as OOM instead of ending the sweep. Compilation dominates the cost of a
cell, so by default all cells are first compiled in parallel subprocesses (``--jobs``) into JAX's persistent
compilation cache, and the timed runs then load their executables from it, one cell at a time. Results are
written after every cell (``<out_dir>/model_sweep_<card>.json``), so a sweep cut short still leaves its
finished cells; ``--resume`` runs only the cells that file lacks (or that timed out, crashed or were skipped),
so that a sweep longer than one command's time limit fills one file, on one card, over several commands;
pre-compilation starts no compile after ``--compile_share`` (default half) of ``--deadline_s``, so a command
always keeps time to measure what it compiled, and leaves the rest to the next ``--resume``.
Parallel pre-compilation can skew a cell: XLA autotunes GEMMs while compiling, and one cell of a session-3 run
came out 1.35x slower than when compiled alone (benchmarks/NOTES.md); for close comparisons use ``--jobs=0``
(each cell compiled alone, just before it runs), and ``--repeats=N`` to run every cell N times, in rounds
whose order reverses every other round (`run_order`: cells drift within a command),
each time compiled afresh without the persistent cache, so the spread covers compilation as well as run-time
noise (a median and min-max per cell are printed). Even a cell compiled alone can come out slow (session 14,
H200: DiG-S/2 at 256 px 1.46x slower in 2 of 7 fresh compilations); `compile_variance.py` measures that
spread and shows what the compiler chose differently.
``--gpus=N`` spreads a sweep over N GPUs of one kind with a barrier: first all pre-compilation (its workers
spread over the GPUs), then the timed cells, one at a time per GPU, from one queue; a cell's throughput is its
own GPU's (``"gpu"`` in its result). Nothing compiles while a cell is timed, as the host's CPUs are shared
(benchmarks/NOTES.md, "H200 (session 14)": small cells on one GPU were slowed while another sweep compiled),
so N > 1 refuses ``--jobs=0`` and ``--repeats`` (both compile in the timed workers).
``--profile`` instead traces training steps of the ``--extra`` cells and writes per-op GPU time
(`trace_summary.py`); ``--extra`` adds cells such as ``"DiG-S/2:256:bf16:gla=chunked"`` (see `extra_cells`).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from benchmarks.worker_process import run_worker, xla_log_lines

SIZES = (256, 512, 768, 1024, 1280, 1536, 1792, 2048)
BATCH = {256: 32, 512: 8, 768: 4, 1024: 4, 1280: 2, 1536: 2, 1792: 2, 2048: 2}
PRECISIONS = ("bf16", "fp32")


def cell(model: str, px: int, precision: str, *, batch: int | None = None, attention: str = "xla",
         gla: str = "auto", remat: str = "none", diag: str = "") -> dict[str, Any]:
  """One benchmark cell (plain JSON data; a worker subprocess gets it on its command line).

  diag="nonorm": a diagnostic run with the step's three tree-norm metrics replaced by zeros (not what users
  run; it measures what those metrics cost); diag="norms_every_step": the norms on every step, as `train_step`
  computed them before they moved to logged steps only (every other cell: every 100th step, as the loop logs);
  diag="flat_optim": AdamW wrapped in `optax.flatten` (one update over a concatenated vector instead of one
  per parameter leaf); diag="no_barrier": `train_step` without the optimization barrier that keeps XLA from
  hoisting the log-step norms into every step's optimizer fusions; diag="gate_cumsum_scan": the GPU GLA op
  forms its chunk-local gate cumsum with `jnp.cumsum` at every length (`gpu.tuned_config` takes the batched
  GEMM from 4096 tokens up since session 6); diag="intra_levels": the GPU GLA kernels' intra-chunk scores
  always through the levels (before session 7: no one-reference-row path); diag="state_s6" / "state_s7": the
  state passes tiled as `gpu.tuned_config` tiled them for few (batch, head) pairs before session 7 / in
  session 7 ((16, 32) K x V tiles, unsegmented / 8 segments), instead of session 8's whole states;
  diag="forward_triton": forwards without a gradient (the sampling forward) on the Pallas-Triton GLA kernels
  instead of the Mosaic GPU ones `gpu.tuned_config` takes from 4096 tokens (session 11).
  Upper bounds of what fusing DiG's own ops could save (diagnostics that change the model, not settings):
  diag="no_forget_gate": a constant log gate (log(1/2)/16, tied to x without a gradient: a constant gate let
  XLA's constant folding run past the cell's time limit) instead of the low-rank projections, logsigmoid and
  their backward; diag="no_output_gate": the GLA output goes to o_proj as it is (no RMSNorm * swish(x Wg); XLA
  then drops the g projection); diag="lean": both; diag="no_gla_op": the GLA op replaced by v (element-wise
  ties to q, k and the gate keep their producers alive); "+" joins several (e.g. "lean+no_gla_op"). With the
  model fields dwconv=off and scan_schedule=causal (no SREM) they leave what DiG shares with DiT.
  """
  _check_diag(diag)
  is_dig = model.startswith("DiG")
  label = model + ("" if is_dig else f"-{attention}")
  if is_dig and gla != "auto":
    label += f"[gla={gla}]"
  for flag, text in ((remat != "none", f"remat={remat}"), (diag, f"diag={diag}")):
    if flag:
      label += f"[{text}]"
  return dict(label=label, model=model, px=px, batch=batch or BATCH[px], precision=precision,
              attention=None if is_dig else attention, gla=gla if is_dig else None, remat=remat, diag=diag)


def _check_diag(diag: str) -> None:
  """One clear error for an unknown diag (a typo would otherwise time the unchanged model under its label)."""
  parts = diag.split("+")
  single = (*STEP_DIAGNOSTICS, *DIAG_KERNEL_OVERRIDES)
  if not diag or (len(parts) == 1 and diag in single) or all(p in MODEL_DIAGNOSTICS for p in parts):
    return
  raise ValueError(f"unknown diag {diag!r}: use one of {', '.join(single)}, or one or more of "
                   f"{', '.join(MODEL_DIAGNOSTICS)} joined with '+'")


def sweep_cells(quick: bool) -> list[dict[str, Any]]:
  if quick:
    sizes, precisions = (256, 1792), ("bf16",)
  else:
    sizes, precisions = SIZES, PRECISIONS
  cells = []
  for precision in precisions:
    for px in sizes:
      cells.append(cell("DiG-S/2", px, precision))
      cells.append(cell("DiT-S/2", px, precision, attention="xla"))
      if precision == "bf16":
        cells.append(cell("DiT-S/2", px, precision, attention="cudnn"))
  if not quick:
    for px in (1024, 2048):
      cells.append(cell("DiG-XL/2", px, "bf16"))
      cells.append(cell("DiT-XL/2", px, "bf16", attention="cudnn"))
  return cells


def _suffix(tag: str) -> str:
  """"--tag 256_x" -> "_256_x" (the file names read model_sweep_<card>_<tag>)."""
  return tag if not tag or tag.startswith("_") else "_" + tag


FINISHED = ("ok", "oom", "n/a")   # statuses that --resume keeps; a timeout, crash or deadline skip runs again


def cell_key(c: dict[str, Any]) -> tuple:
  """What makes a cell (or its result) the same cell: (label, px, batch, precision)."""
  return c["label"], c["px"], c["batch"], c["precision"]


def finished_results(path: str, device_kind: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """For ``--resume``: the results of the earlier run(s) in `path` that need no rerun, and the environments
  they were measured in. Only results of the same kind of card are merged (the file name holds only the
  card's short name: an H100 PCIe and an H100 SXM share it); a file that is not a sweep result stops the run
  with one error (nothing is overwritten)."""
  if not os.path.exists(path):
    return [], []
  try:
    with open(path, encoding="utf-8") as f:
      earlier = json.load(f)
    results = earlier["results"]
    environments = earlier.get("earlier_environments", []) + [earlier["environment"]]
    kept = [r for r in results if r["status"] in FINISHED]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SystemExit(f"--resume: {path} is not a model_sweep result file ({type(e).__name__}: {e}); "
                     "move it away or run without --resume") from e
  measured_on = {e.get("device_kind") for e in environments}
  if measured_on != {device_kind}:
    raise SystemExit(f"--resume: {path} was measured on {sorted(map(str, measured_on))}, this machine has "
                     f"{device_kind!r}; results of two cards are not merged (use another --tag)")
  return kept, environments


# diag names (see `cell`): ones that change the training step, ones that change the GPU GLA op's KernelConfig,
# and the model diagnostics (upper bounds; only these may be joined with "+").
STEP_DIAGNOSTICS = ("nonorm", "norms_every_step", "flat_optim", "no_barrier")
MODEL_DIAGNOSTICS = ("no_forget_gate", "no_output_gate", "lean", "no_gla_op")
DIAG_KERNEL_OVERRIDES = {"gate_cumsum_scan": dict(gate_cumsum="scan"), "intra_levels": dict(intra="levels"),
                         "state_s6": dict(state_block_k=16, state_block_v=32, state_segments=1),
                         "state_s7": dict(state_block_k=16, state_block_v=32, state_segments=8),
                         "forward_triton": dict(forward_backend="triton")}


def extra_cells(spec: str) -> list[dict[str, Any]]:
  """``--extra "DiG-S/2:256:bf16:gla=chunked,DiT-S/2:1792:fp32:attention=xla:batch=1"`` -> cells."""
  cells = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    model, px, precision, *opts = item.split(":")
    kwargs: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for opt in opts:
      key, _, value = opt.partition("=")
      if key == "batch":
        kwargs[key] = int(value)
      elif key == "dump_hlo":
        kwargs[key] = value in ("1", "true", "True")
      elif key in ("attention", "gla", "remat", "diag"):
        kwargs[key] = value
      else:  # any other model-config field (e.g. depth=2 for a smoke test on CPU)
        overrides[key] = (int(value) if value.isdigit() else
                          {"true": True, "false": False}.get(value.lower(), value))
    dump_hlo = kwargs.pop("dump_hlo", False)
    spec = dict(cell(model, int(px), precision, **kwargs), dump_hlo=dump_hlo, overrides=overrides)
    if overrides:
      spec["label"] += "[" + ",".join(f"{k}={v}" for k, v in overrides.items()) + "]"
    cells.append(spec)
  return cells


# ----------------------------------------------------------------------------------------- the orchestrator


def _compile_cost(spec: dict[str, Any]) -> float:
  depth = {"S": 12, "B": 12, "L": 24, "XL": 28}[spec["model"].split("-")[1].split("/")[0]]
  return depth * (2.0 if spec["model"].startswith("DiG") else 1.0)


def environment() -> dict[str, Any]:
  """This process's devices (all visible GPUs). Its JAX client preallocates nothing: the BFC pool is taken at
  the first allocation and this process allocates none (session 14: a worker's peak reached 122.6 of 132.8
  GiB beside it on one H200), so it needs no XLA_PYTHON_CLIENT_PREALLOCATE=false (the workers would inherit
  it)."""
  import jax
  import jaxlib
  devices = jax.devices()
  device = devices[0]
  env = dict(device_kind=device.device_kind, platform=device.platform, device_count=len(devices),
             jax=jax.__version__, jaxlib=jaxlib.__version__, python=sys.version.split()[0],
             date=time.strftime("%Y-%m-%d %H:%M:%S"))
  if len({d.device_kind for d in devices}) > 1:
    env["device_kinds"] = [d.device_kind for d in devices]
  try:
    env["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return env


def launch(spec: dict[str, Any], mode: str, args: argparse.Namespace, timeout: float,
           gpu: int | None = None, xla_flags: str | None = None) -> dict[str, Any]:
  """Runs one worker subprocess; a crash or timeout becomes an error result. `gpu`: the worker sees only this
  process's GPU of that index (CUDA_VISIBLE_DEVICES); None: all that this process sees. `xla_flags`: the
  worker's XLA_FLAGS instead of this process's. XLA's warnings and errors on the worker's stderr (e.g. the
  autotuner's) are kept in the result as `xla_log` (`worker_process.xla_log_lines`)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  if gpu is not None:
    visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if visible else str(gpu)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  if mode == "compile":
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  run = run_worker("benchmarks.model_sweep", spec,
                   ["--mode", mode, "--steps", str(args.steps), "--cache_dir", args.cache_dir], env, timeout)
  if run.timed_out:
    return dict(spec, status="timeout", error=f"worker exceeded {timeout:.0f} s ({mode})")
  if run.result is not None:
    log_lines = xla_log_lines(run.stderr)
    return dict(run.result, xla_log=log_lines) if log_lines else run.result
  tail = (run.stderr or run.stdout)[-1500:]
  status = "oom" if "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower() else "crash"
  return dict(spec, status=status, error=f"exit {run.returncode}: {tail}")


def fmt_cell(r: dict[str, Any]) -> str:
  if r["status"] == "ok":
    peak = (r.get("train_peak_bytes") or 0) / 2**30
    return f"{r['train_images_per_s']:8.2f} {peak:6.2f}G {r['forward_images_per_s']:8.1f}"
  return f"{r['status'].upper():>26s}"


def run_order(cells: list[dict[str, Any]], repeats: int) -> list[tuple[int, dict[str, Any]]]:
  """(repeat, cell) in run order: rounds of all cells, every other round reversed (A B, B A, A B, ...).

  The same cell drifts within a command (session 10, H100, 256 px: 3194 -> 3284 -> 3408 img/s over three
  rounds), so a fixed order credits whichever cell runs later; reversing alternate rounds balances that
  for a pair over an even number of rounds and nearly so over an odd one."""
  return [(i, c) for i in range(repeats) for c in (cells if i % 2 == 0 else cells[::-1])]


def summarize_repeats(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per cell (`cell_key`) of a `--repeats` run: training images/s median, min, max, runs."""
  groups: dict[tuple, list[float]] = {}
  for r in results:
    values = groups.setdefault(cell_key(r), [])
    if r["status"] == "ok":
      values.append(r["train_images_per_s"])
  out = []
  for (label, px, batch, precision), values in groups.items():
    row = dict(label=label, px=px, batch=batch, precision=precision, runs=len(values))
    if values:
      row.update(median=statistics.median(values), min=min(values), max=max(values))
    out.append(row)
  return out


def print_table(results: list[dict[str, Any]], log) -> None:
  log(f"{'cell':34s} {'px':>5s} {'B':>3s} {'prec':>4s} | train img/s   peak | fwd img/s | compile s")
  for r in results:
    comp = f"{r.get('train_compile_s', 0):.0f}/{r.get('forward_compile_s', 0):.0f}"
    log(f"{r['label']:34s} {r['px']:5d} {r['batch']:3d} {r['precision']:>4s} | {fmt_cell(r)} | {comp}")


def precompile(cells: list[dict[str, Any]], args: argparse.Namespace, start: float) -> list[dict[str, Any]]:
  """Compiles `cells` into the persistent cache with `args.jobs` workers, slowest first; returns when all are
  done. Compile worker i uses GPU i % ``args.gpus``, as XLA autotunes on the GPU while compiling; the cache
  key holds the device kind, not the GPU's index (jax/_src/cache_key.py; device assignments are stripped on
  GPU), so a timed run on GPU j loads what a worker compiled on GPU i of the same kind. No compilation starts
  after ``args.compile_share`` of ``args.deadline_s`` (counted from `start`): such cells come back "skipped",
  are not timed in this command, and a ``--resume`` runs them (session 16, one H100: 20 fp32 and XL/2 cells
  compiling with 8 workers took the whole 600 s command, and nothing was timed)."""
  worker_gpu, worker_count = threading.local(), iter(range(args.jobs))

  def pick_gpu() -> None:  # once in each compile worker thread
    worker_gpu.index = next(worker_count) % args.gpus

  def compile_cell(c: dict[str, Any]) -> dict[str, Any]:
    if time.time() - start > args.deadline_s * args.compile_share:
      return dict(c, status="skipped", error=f"not pre-compiled: past {args.compile_share:g} of --deadline_s")
    on_gpu = {} if args.gpus == 1 else {"gpu": worker_gpu.index}
    return dict(launch(c, "compile", args, args.cell_timeout_s + 60, **on_gpu), **on_gpu)

  by_cost = sorted(cells, key=lambda c: -_compile_cost(c))  # start the slowest compiles first
  with concurrent.futures.ThreadPoolExecutor(args.jobs, initializer=pick_gpu) as pool:
    return list(pool.map(compile_cell, by_cost))


def run_timed_cells(order: list[tuple[int, dict[str, Any]]], args: argparse.Namespace, start: float,
                    on_result: Callable[[dict[str, Any], bool], None]) -> None:
  """Runs the (repeat, cell) items of `order` (`run_order`) one cell at a time per GPU: with one GPU in this
  thread, else in one thread per GPU, each taking the next item. `on_result(result, launched)` gets every
  result, under one lock; n/a cells (cuDNN fp32, first repeat only) and cells past the deadline unlaunched."""
  pending, lock, stop = iter(order), threading.Lock(), threading.Event()

  def run_on(gpu: int | None) -> None:
    while not stop.is_set():
      with lock:
        repeat, c = next(pending, (None, None))
      if c is None:
        return
      on_gpu, launched = ({} if gpu is None else {"gpu": gpu}), False
      if c["attention"] == "cudnn" and c["precision"] == "fp32":
        if repeat > 0:
          continue
        result = dict(c, status="n/a", error="cuDNN flash attention needs bf16/fp16")
      elif time.time() - start > args.deadline_s:
        result = dict(c, status="skipped", error="deadline", repeat=repeat)
      else:
        result = dict(launch(c, "run", args, args.cell_timeout_s, **on_gpu), repeat=repeat, **on_gpu)
        launched = True
      with lock:
        on_result(result, launched)

  if args.gpus == 1:
    return run_on(None)
  with concurrent.futures.ThreadPoolExecutor(args.gpus) as pool:
    runs = [pool.submit(run_on, gpu) for gpu in range(args.gpus)]
    try:
      concurrent.futures.wait(runs, return_when=concurrent.futures.FIRST_EXCEPTION)
    finally:  # an error (or Ctrl-C) ends the sweep as on one GPU: no GPU starts another cell
      stop.set()
    for run in runs:
      run.result()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="two sizes, bf16, few steps (a smoke run)")
  parser.add_argument("--out_dir", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__),
                                                                                 "results"))
  parser.add_argument("--jobs", type=int, default=6, help="parallel compile workers (0: no pre-compilation)")
  parser.add_argument("--steps", type=int, default=5, help="minimum timed steps per cell")
  parser.add_argument("--only", default="", help="comma-separated substrings; keep cells whose label matches")
  parser.add_argument("--sizes", default="", help="comma-separated image sizes to keep")
  parser.add_argument("--precisions", default="", help="bf16,fp32")
  parser.add_argument("--extra", default="", help="extra cells, see extra_cells()")
  parser.add_argument("--no_sweep", action="store_true", help="run only the --extra cells")
  parser.add_argument("--deadline_s", type=float, default=540.0, help="start no cell after this many seconds")
  parser.add_argument("--compile_share", type=float, default=0.5,
                      help="pre-compilation starts no compile after this share of --deadline_s")
  parser.add_argument("--cell_timeout_s", type=float, default=240.0)
  parser.add_argument("--cache_dir", default="/tmp/dig_jax_model_sweep_cache")
  parser.add_argument("--tag", default="", help="suffix of the output file name (after an underscore)")
  parser.add_argument("--resume", action="store_true",
                      help="keep the finished cells of the output file (same card) and run only the others")
  parser.add_argument("--repeats", type=int, default=1,
                      help="run every cell this many times, round-robin, each compiled afresh "
                           "(implies --jobs=0)")
  parser.add_argument("--gpus", type=int, default=1, help="time cells on this many GPUs, one cell per GPU at "
                      "a time, after all pre-compilation (see the docstring)")
  parser.add_argument("--profile", action="store_true",
                      help="trace the --extra cells instead (trace_summary)")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  parser.add_argument("--mode", default="run", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    from benchmarks import sweep_worker  # the worker side imports this module's cell constants
    sweep_worker.worker_main(args)
    return
  if args.gpus < 1:
    raise SystemExit(f"--gpus must be >= 1; got {args.gpus}")
  if args.gpus > 1 and (args.repeats > 1 or args.jobs < 1 or args.profile):
    raise SystemExit(f"--gpus {args.gpus} needs pre-compilation (--jobs >= 1), no --repeats, no --profile: "
                     "no cell may compile while another GPU times a cell (repeats compile in their runs)")
  if args.profile:
    from benchmarks import trace_summary
    trace_summary.main(extra_cells(args.extra), args)
    return

  start = time.time()
  os.makedirs(args.out_dir, exist_ok=True)
  env = environment()
  if args.gpus > 1 and (env["device_count"] < args.gpus or "device_kinds" in env):
    kinds = env.get("device_kinds", env["device_kind"])
    raise SystemExit(f"--gpus {args.gpus}: this process sees {env['device_count']} {env['platform']} "
                     f"device(s), {kinds}; it needs {args.gpus} of one kind")
  from benchmarks.bench_common import card_slug
  card = card_slug(env["device_kind"])
  out_stem = os.path.join(args.out_dir, f"model_sweep_{card}{_suffix(args.tag)}")
  out_path = out_stem + ".json"
  log_lines: list[str] = []

  def log(msg: str) -> None:
    print(msg, flush=True)
    log_lines.append(msg)

  cells = [] if args.no_sweep else sweep_cells(args.quick)
  cells += extra_cells(args.extra)
  if args.only:
    cells = [c for c in cells if any(s in c["label"] for s in args.only.split(","))]
  if args.sizes:
    cells = [c for c in cells if str(c["px"]) in args.sizes.split(",")]
  if args.precisions:
    cells = [c for c in cells if c["precision"] in args.precisions.split(",")]
  finished, earlier_envs = [], []
  if args.resume:
    if args.repeats > 1:
      raise SystemExit("--resume cannot be combined with --repeats (each repeat is a new measurement)")
    finished, earlier_envs = finished_results(out_path, env["device_kind"])
    done = {cell_key(r) for r in finished}
    cells = [c for c in cells if cell_key(c) not in done]
  runnable = [c for c in cells if not (c["attention"] == "cudnn" and c["precision"] == "fp32")]
  log(f"{env}\n{len(runnable)} cells -> {out_path}"
      + (f" (resumed: {len(finished)} finished cells kept)" if args.resume else ""))
  if args.quick:
    args.steps = min(args.steps, 2)
  if args.repeats < 1:
    raise SystemExit(f"--repeats must be >= 1; got {args.repeats}")
  if args.repeats > 1:  # every run compiles on its own, without the persistent cache (see the docstring)
    args.jobs, args.cache_dir = 0, ""

  not_compiled: list[dict[str, Any]] = []
  if args.jobs > 0:  # all of it before the first timed cell, on any GPU
    t0 = time.time()
    for r in precompile(runnable, args, start):
      if r["status"] == "skipped":
        not_compiled.append(r)
      elif r["status"] != "ok":
        log(f"  compile {r['label']} {r['px']} {r['precision']}: {r['status']} {r.get('error', '')[:300]}")
    log(f"pre-compiled {len(runnable) - len(not_compiled)} cells in {time.time() - t0:.0f} s"
        + (f"; {len(not_compiled)} left for a --resume (no compilation starts after "
           f"{args.compile_share:g} of --deadline_s)" if not_compiled else ""))
    skip = {cell_key(r) for r in not_compiled}
    cells = [c for c in cells if cell_key(c) not in skip]

  results: list[dict[str, Any]] = list(finished) + not_compiled

  def save(**extra: Any) -> None:  # after every cell, so a sweep cut short keeps its finished cells
    if earlier_envs:
      extra["earlier_environments"] = earlier_envs
    if args.gpus > 1:
      extra["gpus"] = args.gpus
    with open(out_path, "w", encoding="utf-8") as f:
      json.dump(dict(environment=env, card=card, batch_sizes=BATCH, results=results, **extra), f, indent=1)

  def on_result(r: dict[str, Any], launched: bool) -> None:
    results.append(r)
    if launched:
      where = f"gpu{r['gpu']} " if "gpu" in r else ""
      log(f"[{time.time() - start:5.0f}s] {where}{r['label']:34s} {r['px']:5d} B{r['batch']:<3d} "
          f"{r['precision']} {fmt_cell(r)}"
          + (f"  {r.get('error', '')[:200]}" if r["status"] not in ("ok", "oom") else ""))
      save()

  run_timed_cells(run_order(cells, args.repeats), args, start, on_result)
  print_table(results, log)
  if args.repeats > 1:
    summary = summarize_repeats(results)
    log(f"{args.repeats} runs per cell, each compiled afresh; training images/s median [min, max] (runs ok):")
    for s in summary:
      spread = (f"{s['median']:9.2f} [{s['min']:.2f}, {s['max']:.2f}]" if s["runs"] else "no run ok")
      log(f"  {s['label']:34s} {s['px']:5d} B{s['batch']:<3d} {s['precision']}  {spread} ({s['runs']})")
    save(repeats=summary)
  else:
    save()
  with open(out_stem + ".log", "a" if args.resume else "w", encoding="utf-8") as f:
    f.write("\n".join(log_lines) + "\n")


if __name__ == "__main__":
  main()
