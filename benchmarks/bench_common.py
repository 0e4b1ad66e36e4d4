"""Measurement plumbing shared by the benchmark scripts: device names, timing, inputs, environment, fla.

`gla_kernel.py` times the GLA op with these helpers (median of back-to-back calls after warm-up, device copy
bandwidth as the HBM ceiling, fla's PyTorch `chunk_gla` as the external baseline); `model_sweep.py` takes
`card_slug` for its file names. Nothing here measures by itself at import.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import numpy as np

import jax
import jax.numpy as jnp


def card_slug(device_kind: str) -> str:
  """A short file-name tag for a device: h200, h100, a100, l4, b200, cpu, or the sanitised device kind."""
  for name in ("h200", "h100", "a100", "l4", "b200", "cpu"):
    if name in device_kind.lower():
      return name
  return "".join(ch if ch.isalnum() else "_" for ch in device_kind.lower())


LOG: list[str] = []


T_START = time.time()


def log(msg: str) -> None:
  msg = f"[{time.time() - T_START:6.1f}s] {msg}"
  print(msg, flush=True)
  LOG.append(msg)


# ----------------------------------------------------------------------------------------------------- timing


def time_calls(fn, arg_sets, sync, reps: int = 15, target_s: float = 3e-3) -> float:
  """Median seconds per call over `reps` repeats of back-to-back calls (rotating `arg_sets`)."""
  for args in arg_sets:
    sync(fn(*args))
  t0 = time.perf_counter()
  sync(fn(*arg_sets[0]))
  one = time.perf_counter() - t0
  inner = int(max(1, min(100, target_s / max(one, 1e-6))))
  times = []
  for r in range(reps):
    t0 = time.perf_counter()
    for i in range(inner):
      out = fn(*arg_sets[(r * inner + i) % len(arg_sets)])
    sync(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def jax_sync(x):
  jax.block_until_ready(x)


def copy_bandwidth() -> float:
  """Bytes read + written per second of a large device copy (jitted x + 1 over 1 GiB fp32)."""
  x = jnp.ones((256, 1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a + 1.0)
  t = time_calls(f, [(x,)], jax_sync, reps=20)
  return 2 * x.size * 4 / t


# ----------------------------------------------------------------------------------------------------- inputs


def make_inputs(key, b, t, h, dk, dv, dtype, gates: str = "dig"):
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (b, t, h, dk), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, h, dk), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv), jnp.float32).astype(dtype)
  if gates == "dig":    # logsigmoid(x)/16, the model's gate
    lg = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, dk)) * 2.0) / 16.0
  else:                 # log-uniform magnitudes in [1e-3, 10]
    lg = -jnp.exp(jax.random.uniform(ks[3], (b, t, h, dk), minval=np.log(1e-3), maxval=np.log(10.0)))
  do = jax.random.normal(ks[4], (b, t, h, dv), jnp.float32).astype(dtype)
  return q, k, v, lg, do


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if not np.all(np.isfinite(a)):
    return float("nan")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------------ fla (torch)


def load_fla():
  try:
    import torch  # noqa: F401
    from fla.ops.gla import chunk_gla
    import fla
    return chunk_gla, getattr(fla, "__version__", "?"), None
  except Exception as e:  # noqa: BLE001 - recorded, not fatal
    return None, None, f"{type(e).__name__}: {e}"


def to_torch(x):
  import torch
  return torch.utils.dlpack.from_dlpack(jax.block_until_ready(x))


def time_fla(chunk_gla, inputs_sets):
  import torch
  sets = []
  for q, k, v, g, do in inputs_sets:
    tq, tk, tv, tg, tdo = (to_torch(x).clone() for x in (q, k, v, g.astype(jnp.float32), do))
    for x in (tq, tk, tv, tg):
      x.requires_grad_(True)
    sets.append((tq, tk, tv, tg, tdo))
  sync = lambda _: torch.cuda.synchronize()
  with torch.no_grad():
    fwd = time_calls(lambda q, k, v, g, do: chunk_gla(q, k, v, g)[0], sets, sync)

  def fwd_bwd(q, k, v, g, do):
    o = chunk_gla(q, k, v, g)[0]
    return torch.autograd.grad(o, (q, k, v, g), do)
  return fwd, time_calls(fwd_bwd, sets, sync)


def env_info() -> dict:
  info = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, platform=jax.default_backend())
  try:
    import jaxlib
    info["jaxlib"] = jaxlib.__version__
  except Exception:  # noqa: BLE001
    pass
  for mod in ("triton", "torch"):
    try:
      info[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001
      info[mod] = f"unavailable: {e}"
  try:
    query = "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit"
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True, text=True,
                                        timeout=30).stdout.strip()
  except Exception as e:  # noqa: BLE001
    info["nvidia_smi"] = str(e)
  return info


# ------------------------------------------------------------------------------------------ command lines


def shapes_parser(shapes_help: str) -> argparse.ArgumentParser:
  """The options every shape-list benchmark takes: --out (default $OUT, else benchmarks/results), --shapes
  ("a,b,c;d,e,f"), --tag (suffix of the output file name)."""
  parser = argparse.ArgumentParser()
  default_out = os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--out", default=default_out)
  parser.add_argument("--shapes", default="", help=shapes_help)
  parser.add_argument("--tag", default="", help="suffix of the output file name")
  return parser


def parse_shapes(text: str, default: tuple) -> list[tuple[int, ...]]:
  return [tuple(int(x) for x in s.split(",")) for s in text.split(";") if s] or list(default)


def result_path(out: str, name: str, device_kind: str, tag: str) -> str:
  """<out>/<name>_<card>[_<tag>].json (the folder is created)."""
  os.makedirs(out, exist_ok=True)
  return os.path.join(out, f"{name}_{card_slug(device_kind)}{'_' + tag if tag else ''}.json")


def run_shapes(shapes, bench_shape, result: dict, path: str, print_table) -> None:
  """bench_shape(shape) -> row for each shape into result["timings"] (a failing shape is logged into
  result["failures"] and the others still run), the JSON rewritten after each, then the table."""
  for shape in shapes:
    try:
      result["timings"].append(bench_shape(shape))
    except Exception as e:  # noqa: BLE001 - one shape failing must not lose the others
      log(f"shape {shape} failed: {type(e).__name__}: {str(e)[:2000]}")
      result.setdefault("failures", []).append(dict(shape=shape, error=f"{type(e).__name__}: {e}"[:4000]))
    with open(path, "w") as fh:
      json.dump(result, fh, indent=1)
  print_table(result["timings"])
  log(f"wrote {path}")
