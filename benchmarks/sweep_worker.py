"""The worker side of `model_sweep`: builds one cell's training step and forward, compiles, times them.

`model_sweep` runs every cell in its own subprocess (``python -m benchmarks.model_sweep --worker SPEC``),
so a cell's peak memory and an out-of-memory error stay its own; that process lands in `worker_main` here.
What a cell measures, and the diagnostics it can apply, are described in `model_sweep`'s docstring and
`model_sweep.cell`. Split from `model_sweep` (the orchestrator) in session 14 to keep each file readable.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import time
from typing import Any

from benchmarks.model_sweep import DIAG_KERNEL_OVERRIDES, MODEL_DIAGNOSTICS
from benchmarks.worker_process import emit_result

TRAIN_TARGET_S = 1.0  # timed steps per cell: at least --steps, more until this much time (at most 20)
FWD_TARGET_S = 0.5


def _is_oom(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def apply_model_diagnostics(diag: str, set_attr=setattr) -> None:
  """Patches the GLA layer for the upper-bound diagnostics of `cell` ("+"-joined names of MODEL_DIAGNOSTICS).

  A worker process runs one cell, so the patches (class and module attributes) live as long as it; tests pass
  `monkeypatch.setattr` as `set_attr`."""
  parts = set(diag.split("+"))
  if not parts & set(MODEL_DIAGNOSTICS):
    return
  import jax
  import jax.numpy as jnp

  from dig_jax.models import gla_attention as gla_layer
  if parts & {"no_forget_gate", "lean"}:
    def constant_gate(self, x):  # tied to x without a gradient, so XLA neither folds nor differentiates it
      tie = jax.lax.stop_gradient(x[..., :1]).astype(jnp.float32) * 0.0
      return jnp.broadcast_to(tie + jnp.log(0.5) / 16, (*x.shape[:-1], self.num_heads * self.head_k_dim))
    set_attr(gla_layer.GatedLinearAttention, "log_forget_gate", constant_gate)
    set_attr(gla_layer.GatedLinearAttention, "low_rank_gate",  # the fused-gate path: hand the op the same
             lambda self, x: constant_gate(self, x).reshape(*x.shape[:-1], self.num_heads, self.head_k_dim))
  if parts & {"no_output_gate", "lean"}:
    set_attr(gla_layer.RMSNormSwishGate, "__call__", lambda self, o, g: o)
  if "no_gla_op" in parts:
    from pallas_kernels.gla.gate import LowRankGate, low_rank_log_gate

    def free_mixer(q, k, v, g, **_):  # v, kept dependent on q, k and g through element-wise math only
      g = low_rank_log_gate(g, q.shape[2]) if isinstance(g, LowRankGate) else g
      tie = (q.sum(-1, keepdims=True) + k.sum(-1, keepdims=True)).astype(jnp.float32)
      tie = tie + g.sum(-1, keepdims=True)
      return (v.astype(jnp.float32) * (1.0 + 0.0 * tie)).astype(v.dtype)
    set_attr(gla_layer, "gla", free_mixer)


def _build(spec: dict[str, Any]):
  """(step_fn, fwd_fn, state, batch, rng, graphdef) for a cell; arrays created on the default device."""
  import functools

  import jax
  import jax.numpy as jnp
  import ml_collections
  from flax import nnx

  from dig_jax import diffusion as diffusion_lib, models, optim, train
  if spec.get("diag") == "nonorm":  # diagnostic only: what the per-leaf norm metrics cost
    import optax
    optax.tree.norm = lambda tree, *a, **k: jnp.zeros((), jnp.float32)
  if spec.get("diag") == "no_barrier":  # diagnostic: the log-step norms without train_step's barrier
    jax.lax.optimization_barrier = lambda tree: tree
  apply_model_diagnostics(spec.get("diag", ""))
  kernel_overrides = DIAG_KERNEL_OVERRIDES.get(spec.get("diag", ""))
  if kernel_overrides:  # diagnostic: the GPU GLA op with other KernelConfig fields than gpu.tuned_config's
    import dataclasses
    from pallas_kernels.gla import gpu
    tuned = gpu.tuned_config
    gpu.tuned_config = lambda *a, **k: dataclasses.replace(tuned(*a, **k), **kernel_overrides)
  latent = spec["px"] // 8
  overrides = dict(input_size=latent, in_channels=4, num_classes=1000, learn_sigma=True,
                   dtype="bfloat16" if spec["precision"] == "bf16" else "float32", remat=spec["remat"])
  if spec["attention"]:
    overrides["attention_impl"] = spec["attention"]
  if spec["gla"]:
    overrides["gla_impl"] = spec["gla"]
  overrides.update(spec.get("overrides", {}))
  model_config = models.model_config_for(spec["model"], **overrides)
  optim_config = ml_collections.ConfigDict(dict(  # the paper's recipe (configs/common.py)
      learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, schedule="constant", warmup_steps=0,
      min_lr_ratio=0.0, grad_clip_norm=0.0))
  tx, lr_schedule = optim.create_optimizer(optim_config, 1000)
  if spec.get("diag") == "flat_optim":  # diagnostic: AdamW on one concatenated vector (optax.flatten)
    import optax
    tx = optax.flatten(tx)
  diffusion = diffusion_lib.create_diffusion("", num_timesteps=1000, noise_schedule="linear",
                                             learn_sigma=True)
  abstract_model = nnx.eval_shape(lambda: models.create_model(model_config, rngs=nnx.Rngs(0)))
  graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  init_key, data_key, rng = jax.random.split(jax.random.key(0), 3)
  state = jax.jit(functools.partial(train._init_state, model_config=model_config, tx=tx))(init_key)
  b = spec["batch"]
  k1, k2 = jax.random.split(data_key)
  batch = {"image": jax.random.normal(k1, (b, latent, latent, 4), jnp.float32),
           "label": jax.random.randint(k2, (b,), 0, 1000, jnp.int32)}
  # As the training loop runs it: the grad/param/update norms only on logged steps (every 100 by default);
  # diag="norms_every_step" measures the step as it was before that change (norms on every step).
  log_every = 1 if spec.get("diag") == "norms_every_step" else 100
  step_fn = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx, diffusion=diffusion,
                                      lr_schedule=lr_schedule, ema_decay=0.9999, label_dropout=True,
                                      log_every_steps=log_every, num_train_steps=10**9),
                    donate_argnums=(0,))

  def forward(params, model_state, x, t, y):
    return nnx.merge(graphdef, params, model_state)(x, t, y)

  return step_fn, jax.jit(forward), state, batch, rng


def _median_time(fn, min_reps: int, target_s: float, max_reps: int) -> list[float]:
  import jax
  times: list[float] = []
  while len(times) < min_reps or (sum(times) < target_s and len(times) < max_reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def _memory_analysis(compiled) -> dict[str, int] | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend has it
    return None
  if m is None:
    return None
  return {f: int(getattr(m, f, 0)) for f in ("argument_size_in_bytes", "output_size_in_bytes",
                                             "temp_size_in_bytes", "alias_size_in_bytes")}


def _write_gzipped(path: str, text: str) -> None:
  """An optimised module's text as gzip (`hlo_decisions.read_text` reads it back): the profile's dump and
  `_save_hlo`'s."""
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write(text)


def _profile(one_step, hlo_text: str, spec: dict[str, Any], steps: int = 3) -> dict[str, Any]:
  """Traces `steps` training steps; per-op GPU time (trace_summary.summarize). Optionally dumps the HLO."""
  import tempfile

  import jax

  from benchmarks import trace_summary
  trace_dir = tempfile.mkdtemp(prefix="dig_trace_")
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      metrics = one_step()
    jax.block_until_ready(metrics)
  if spec.get("dump_hlo") and os.environ.get("OUT"):
    name = f"hlo_{spec['label']}_{spec['px']}_{spec['precision']}"
    name = "".join(ch if ch.isalnum() else "_" for ch in name)
    _write_gzipped(os.path.join(os.environ["OUT"], name + ".txt.gz"), hlo_text)
  return trace_summary.summarize(trace_dir, hlo_text, steps)


def _save_hlo(spec: dict[str, Any], which: str, compiled, out: dict[str, Any]) -> None:
  """With spec["hlo_prefix"], writes the optimised module (`compiled.as_text()`, the compiler's choices
  included: `hlo_decisions`) to <prefix>_<which>.txt.gz and records the path in out["hlo_files"]."""
  if not spec.get("hlo_prefix"):
    return
  path = f"{spec['hlo_prefix']}_{which}.txt.gz"
  _write_gzipped(path, compiled.as_text())
  out.setdefault("hlo_files", {})[which] = path


def keep_autotune_results(which: str, out: dict[str, Any]) -> None:
  """With XLA_FLAGS --xla_gpu_dump_autotune_results_to=PATH, copies PATH to PATH.<which> right after the
  `which` program's compilation: XLA rewrites PATH after every compilation, and the worker's later small
  ones (random inputs, the forward) left it nearly empty (session 15). Records the copy in out."""
  match = re.search(r"--xla_gpu_dump_autotune_results_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
  if match and os.path.exists(match.group(1)):
    shutil.copyfile(match.group(1), f"{match.group(1)}.{which}")
    out.setdefault("autotune_results", {})[which] = f"{match.group(1)}.{which}"


def run_worker(spec: dict[str, Any], mode: str, steps: int) -> dict[str, Any]:
  """Compiles (mode "compile") or compiles and times (mode "run") one cell; returns a result dict."""
  import contextlib

  import jax
  import jax.numpy as jnp

  out: dict[str, Any] = dict(spec, status="ok")
  precision = (jax.default_matmul_precision("tensorfloat32") if spec["precision"] == "fp32"
               else contextlib.nullcontext())
  stage = "build"
  try:
    with precision:
      step_fn, fwd_fn, state, batch, rng = _build(spec)
      stage = "compile"
      t0 = time.perf_counter()
      step = step_fn.lower(state, batch, rng).compile()
      out["train_compile_s"] = time.perf_counter() - t0
      out["train_memory_analysis"] = _memory_analysis(step)
      _save_hlo(spec, "train", step, out)
      keep_autotune_results("train", out)
      b, latent = spec["batch"], spec["px"] // 8
      keys = jax.random.split(jax.random.key(1), 3)
      x = jax.random.normal(keys[0], (b, latent, latent, 4), jnp.float32)
      t = jax.random.randint(keys[1], (b,), 0, 1000, jnp.int32)
      y = jax.random.randint(keys[2], (b,), 0, 1000, jnp.int32)
      fwd_args = (state["ema_params"], state.get("model_state", {}), x, t, y)
      t0 = time.perf_counter()
      fwd = fwd_fn.lower(*fwd_args).compile()
      out["forward_compile_s"] = time.perf_counter() - t0
      out["forward_memory_analysis"] = _memory_analysis(fwd)
      _save_hlo(spec, "forward", fwd, out)
      keep_autotune_results("forward", out)
      if mode == "compile":
        return out
      stage = "train"
      holder = {"state": state}

      def one_step():
        holder["state"], metrics = step(holder["state"], batch, rng)
        return metrics

      for _ in range(2):
        metrics = one_step()
      jax.block_until_ready(metrics)
      times = _median_time(one_step, min_reps=steps, target_s=TRAIN_TARGET_S, max_reps=max(steps, 20))
      out["train_step_s"] = statistics.median(times)
      out["train_step_times_s"] = times
      out["train_images_per_s"] = b / out["train_step_s"]
      out["loss"] = float(one_step()["loss"])
      device = jax.devices()[0]
      stats = device.memory_stats() or {}
      out["train_peak_bytes"] = stats.get("peak_bytes_in_use")
      out["bytes_limit"] = stats.get("bytes_limit")
      if mode == "profile":
        stage = "profile"
        out["profile"] = _profile(one_step, step.as_text(), spec)
      stage = "forward"
      fwd_args = (holder["state"]["ema_params"], holder["state"].get("model_state", {})) + fwd_args[2:]
      jax.block_until_ready(fwd(*fwd_args))
      times = _median_time(lambda: fwd(*fwd_args), min_reps=steps, target_s=FWD_TARGET_S,
                           max_reps=max(steps, 30))
      out["forward_s"] = statistics.median(times)
      out["forward_images_per_s"] = b / out["forward_s"]
      out["peak_bytes_after_forward"] = (device.memory_stats() or {}).get("peak_bytes_in_use")
  except Exception as e:  # noqa: BLE001 - reported per cell
    out["status"] = "oom" if _is_oom(e) else "error"
    out["failed_stage"] = stage
    out["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
  return out


def worker_main(args: argparse.Namespace) -> None:
  import jax
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  spec = json.loads(args.worker)
  result = run_worker(spec, args.mode, args.steps)
  emit_result(result)
