"""The resolution-sweep script's pure parts (benchmarks/model_sweep.py): cell specs, the repeat summary, the
`--profile` report and `--resume` (workers replaced) and the model diagnostics' patches."""
import subprocess

import pytest

from benchmarks import model_sweep, sweep_worker, worker_process


def test_extra_cells_parse_model_overrides_with_types():
  spec = "DiG-S/2:256:bf16:gla_fused_proj=false:depth=2:gla_gate_dtype=compute:batch=4"
  (cell,) = model_sweep.extra_cells(spec)
  assert cell["batch"] == 4 and cell["px"] == 256 and cell["precision"] == "bf16"
  assert cell["overrides"] == {"gla_fused_proj": False, "depth": 2, "gla_gate_dtype": "compute"}
  assert cell["label"] == "DiG-S/2[gla_fused_proj=False,depth=2,gla_gate_dtype=compute]"


def test_summarize_repeats_groups_runs_and_ignores_failed_ones():
  base = dict(label="DiG-S/2", px=256, batch=32, precision="bf16")
  results = [dict(base, status="ok", train_images_per_s=v, repeat=i)
             for i, v in enumerate((2500.0, 1900.0, 2600.0))]
  results.append(dict(base, status="oom", repeat=3))
  results.append(dict(base, label="DiT-S/2-cudnn", status="error", repeat=0))
  summary = {s["label"]: s for s in model_sweep.summarize_repeats(results)}
  assert summary["DiG-S/2"] == dict(base, runs=3, median=2500.0, min=1900.0, max=2600.0)
  assert summary["DiT-S/2-cudnn"]["runs"] == 0 and "median" not in summary["DiT-S/2-cudnn"]


def test_profile_mode_writes_one_summary_per_cell(tmp_path, monkeypatch):
  """`--profile` (trace_summary.main) with the worker replaced: one section per cell, failures reported."""
  import argparse

  from benchmarks import trace_summary
  profile = dict(total_ms=1.5, by_category_ms={"gla_op": 1.0, "other": 0.5}, kernels_per_step_by_category={},
                 threads={"gpu": 1.5}, top_ops=[("fusion.1", 0.25, 3, "jit(train_step)/add")],
                 top_other_ops=[])
  outcomes = iter([dict(status="ok", train_step_s=0.01, profile=profile), dict(status="error", error="boom")])
  monkeypatch.setattr(model_sweep, "launch", lambda spec, mode, args, timeout: next(outcomes))
  monkeypatch.setattr(model_sweep, "environment", lambda: dict(device_kind="NVIDIA H100 80GB HBM3"))
  monkeypatch.setenv("XLA_FLAGS", "")  # main sets the workers' flags in os.environ; restored after the test
  args = argparse.Namespace(out_dir=str(tmp_path), tag="_t", jobs=0, cell_timeout_s=10)
  trace_summary.main(model_sweep.extra_cells("DiG-S/2:256:bf16,DiT-S/2:256:bf16"), args)
  (written,) = tmp_path.glob("profile_*_t.txt")
  text = written.read_text()
  assert "== DiG-S/2 256px B32 bf16 (step 10.00 ms wall): GPU kernel time 1.500 ms / step" in text
  assert "by category: gla_op 1.000, other 0.500" in text and "fusion.1" in text
  assert "== DiT-S/2-xla 256px B32 bf16: error boom" in text
  assert "XLA_FLAGS=--xla_gpu_enable_command_buffer=\n" in text  # per-op times need command buffers off


def test_profile_turns_command_buffers_off_unless_the_flags_choose():
  from benchmarks import trace_summary
  assert trace_summary.profile_xla_flags("") == "--xla_gpu_enable_command_buffer="
  assert (trace_summary.profile_xla_flags("--xla_dump_to=/d")
          == "--xla_dump_to=/d --xla_gpu_enable_command_buffer=")
  own = "--xla_gpu_enable_command_buffer=FUSION"
  assert trace_summary.profile_xla_flags(own) == own


def test_model_diagnostics_patch_the_gla_layer_as_documented(monkeypatch):
  """The upper-bound diagnostics: a constant log gate without a gradient, no output norm-gate, the op -> v."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from dig_jax.models import gla_attention as gla_layer
  op = gla_layer.gla
  sweep_worker.apply_model_diagnostics("nonorm", monkeypatch.setattr)  # not a model diagnostic: no patch
  assert gla_layer.gla is op
  sweep_worker.apply_model_diagnostics("lean+no_gla_op", monkeypatch.setattr)
  layer = gla_layer.GatedLinearAttention(64, 2, rngs=nnx.Rngs(0), dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(0), (2, 8, 64))
  gate = layer.log_forget_gate(x)
  assert gate.shape == (2, 8, 32) and bool(jnp.all(gate == jnp.log(0.5) / 16))
  assert not bool(jnp.any(jax.grad(lambda x: layer.log_forget_gate(x).sum())(x)))
  # The fused-gate path (the default) hands the op the same constant gate instead of a LowRankGate.
  assert layer.fused_gate
  assert bool(jnp.all(layer.low_rank_gate(x) == gate.reshape(2, 8, 2, 16)))
  o = jnp.ones((2, 8, 2, 32))
  assert layer.g_norm_swish_gate(o, 5 * o) is o
  want = layer.o_proj(layer.v_proj(x))  # the op passes v through, nothing gates it
  assert float(jnp.max(jnp.abs(layer(x) - want))) < 1e-5


def test_unknown_diag_names_fail_with_one_clear_error():
  for ok in ("nonorm", "state_s7", "lean+no_gla_op", "no_forget_gate"):
    assert model_sweep.extra_cells(f"DiG-S/2:256:bf16:diag={ok}")[0]["diag"] == ok
  for bad in ("no_forget_gat", "nonorm+lean", "lean+"):
    with pytest.raises(ValueError, match="unknown diag"):
      model_sweep.extra_cells(f"DiG-S/2:256:bf16:diag={bad}")


def test_repeats_alternate_the_order_of_the_cells():
  a, b, c = (dict(label=n) for n in "abc")
  order = [(r, cell["label"]) for r, cell in model_sweep.run_order([a, b, c], 3)]
  assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c")]
  assert model_sweep.run_order([a], 1) == [(0, a)]


def _ok_result(spec):
  return dict(spec, status="ok", train_images_per_s=1000.0, train_peak_bytes=2**30, forward_images_per_s=1.0)


def _run_main(monkeypatch, tmp_path, argv, device_kind="NVIDIA H100 80GB HBM3", device_count=1,
              device_kinds=None, fake_launch=None):
  """model_sweep.main with the workers replaced: every launched cell reports 1000 img/s; returns the specs
  (the default fake takes launch's four arguments only: with one GPU, main passes no `gpu`)."""
  import sys
  launched = []

  def record_launch(spec, mode, args, timeout):
    launched.append(spec)
    return _ok_result(spec)

  monkeypatch.setattr(model_sweep, "launch", fake_launch or record_launch)
  env = dict(device_kind=device_kind, device_count=device_count, platform="gpu")
  if device_kinds:  # environment() names the kinds only when they differ
    env["device_kinds"] = device_kinds
  monkeypatch.setattr(model_sweep, "environment", lambda: dict(env))
  monkeypatch.setattr(sys, "argv", ["model_sweep", "--out_dir", str(tmp_path), "--jobs", "0", "--no_sweep",
                                    "--tag", "t", *argv])
  model_sweep.main()
  return launched


def test_resume_runs_only_the_cells_the_file_lacks_and_keeps_the_rest(monkeypatch, tmp_path):
  import json
  extra = ["--extra", "DiG-S/2:256:bf16,DiT-S/2:256:bf16:attention=cudnn,DiT-S/2:256:fp32:attention=cudnn"]
  path = tmp_path / "model_sweep_h100_t.json"
  first = _run_main(monkeypatch, tmp_path, extra)
  assert [c["label"] for c in first] == ["DiG-S/2", "DiT-S/2-cudnn"]       # cuDNN fp32: n/a, not launched
  saved = json.loads(path.read_text())
  saved["results"][1].update(status="timeout", error="worker exceeded 240 s (run)")  # as if cut short
  path.write_text(json.dumps(saved))
  again = _run_main(monkeypatch, tmp_path, extra + ["--resume"])
  assert [c["label"] for c in again] == ["DiT-S/2-cudnn"]                    # only the unfinished cell
  merged = json.loads(path.read_text())
  assert [(r["label"], r["precision"], r["status"]) for r in merged["results"]] == [
      ("DiG-S/2", "bf16", "ok"), ("DiT-S/2-cudnn", "fp32", "n/a"), ("DiT-S/2-cudnn", "bf16", "ok")]
  assert len(merged["earlier_environments"]) == 1
  # Without --resume the same command measures everything again.
  assert len(_run_main(monkeypatch, tmp_path, extra)) == 2


def test_resume_refuses_another_card_or_a_foreign_file_and_leaves_it_alone(monkeypatch, tmp_path):
  extra = ["--extra", "DiG-S/2:256:bf16"]
  _run_main(monkeypatch, tmp_path, extra)
  path = tmp_path / "model_sweep_h100_t.json"
  # Another kind of H100 writes the same file name (card slug "h100"): its results are never merged.
  before = path.read_text()
  with pytest.raises(SystemExit, match=r"measured on \['NVIDIA H100 80GB HBM3'\].*two cards are not merged"):
    _run_main(monkeypatch, tmp_path, extra + ["--resume"], device_kind="NVIDIA H100 PCIe-like")
  assert path.read_text() == before
  path.write_text("{not json")
  with pytest.raises(SystemExit, match="not a model_sweep result file"):
    _run_main(monkeypatch, tmp_path, extra + ["--resume"])
  assert path.read_text() == "{not json"
  with pytest.raises(SystemExit, match="cannot be combined with --repeats"):
    _run_main(monkeypatch, tmp_path, extra + ["--resume", "--repeats", "2"])


def test_precompilation_past_its_share_of_the_deadline_leaves_cells_to_resume(monkeypatch, tmp_path):
  """Compiles that would start after --compile_share of --deadline_s do not start; those cells are saved as
  skipped and not timed, the compiled ones are timed, and --resume runs the rest (session 16: a command spent
  its 600 s compiling and timed nothing)."""
  import json
  clock = [1000.0]
  monkeypatch.setattr(model_sweep.time, "time", lambda: clock[0])
  calls = []

  def slow_compile(spec, mode, args, timeout):
    calls.append((mode, spec["label"], spec["px"]))
    clock[0] += 30.0 if mode == "compile" else 1.0  # each compilation takes 30 s, each timed run 1 s
    return _ok_result(spec) if mode == "run" else dict(spec, status="ok")

  cells = ["--extra", "DiG-S/2:256:bf16,DiG-S/2:512:bf16,DiG-S/2:768:bf16,DiG-S/2:1024:bf16"]
  argv = cells + ["--jobs", "1", "--deadline_s", "100", "--compile_share", "0.5"]
  _run_main(monkeypatch, tmp_path, argv, fake_launch=slow_compile)
  compiled = [c for c in calls if c[0] == "compile"]
  assert len(compiled) == 2              # started at 0 and 30 s; the third would start at 60 > 50
  assert sorted(c[1:] for c in calls if c[0] == "run") == sorted(c[1:] for c in compiled)  # those alone
  saved = json.loads((tmp_path / "model_sweep_h100_t.json").read_text())
  statuses = sorted((r["px"], r["status"]) for r in saved["results"])
  timed = {px for _, _, px in compiled}
  assert statuses == sorted((px, "ok" if px in timed else "skipped") for px in (256, 512, 768, 1024))
  assert all("not pre-compiled" in r["error"] for r in saved["results"] if r["status"] == "skipped")
  calls.clear()
  _run_main(monkeypatch, tmp_path, argv + ["--resume"], fake_launch=slow_compile)
  assert sorted(px for mode, _, px in calls if mode == "run") == sorted({256, 512, 768, 1024} - timed)


TWO_GPU_CELLS = ["--extra", "DiG-S/2:256:bf16,DiT-S/2:256:bf16:attention=cudnn,"
                 "DiT-S/2:256:fp32:attention=cudnn,DiG-S/2:512:bf16,DiT-S/2:512:bf16,DiG-XL/2:256:bf16"]


def test_two_gpus_compile_everything_first_then_run_one_cell_per_gpu_at_a_time(monkeypatch, tmp_path):
  """--gpus 2: a barrier between compilation and timed runs, each run on one GPU, never two on one GPU."""
  import json
  import threading
  import time
  lock = threading.Lock()
  calls, in_flight, overlaps = [], {0: 0, 1: 0}, []

  def fake_launch(spec, mode, args, timeout, gpu=None):
    with lock:
      calls.append((mode, spec["label"], spec["px"], gpu))
      if mode == "run":
        in_flight[gpu] += 1
        if in_flight[gpu] > 1:
          overlaps.append((gpu, spec["label"]))
    time.sleep(0.01)
    with lock:
      if mode == "run":
        in_flight[gpu] -= 1
    return _ok_result(spec)

  _run_main(monkeypatch, tmp_path, TWO_GPU_CELLS + ["--gpus", "2", "--jobs", "2"], device_count=2,
            fake_launch=fake_launch)
  modes = [mode for mode, *_ in calls]
  assert modes == ["compile"] * 5 + ["run"] * 5              # cuDNN fp32 is n/a: neither compiled nor run
  assert {gpu for mode, *_, gpu in calls if mode == "compile"} <= {0, 1}
  run_gpus = [gpu for mode, *_, gpu in calls if mode == "run"]
  assert set(run_gpus) == {0, 1} and not overlaps
  saved = json.loads((tmp_path / "model_sweep_h100_t.json").read_text())
  assert saved["gpus"] == 2
  ran = [r for r in saved["results"] if r["status"] == "ok"]
  assert len(ran) == 5 and all(r["gpu"] in (0, 1) for r in ran)
  assert [r["status"] for r in saved["results"] if "gpu" not in r] == ["n/a"]
  log = (tmp_path / "model_sweep_h100_t.log").read_text()
  assert "s] gpu0 " in log and "s] gpu1 " in log


def test_two_gpus_resume_keeps_finished_cells(monkeypatch, tmp_path):
  import json
  path = tmp_path / "model_sweep_h100_t.json"
  argv = TWO_GPU_CELLS + ["--gpus", "2", "--jobs", "2"]
  _run_main(monkeypatch, tmp_path, argv, device_count=2,
            fake_launch=lambda spec, mode, args, timeout, gpu=None: _ok_result(spec))
  saved = json.loads(path.read_text())
  saved["results"] = [r for r in saved["results"] if r["label"] != "DiG-XL/2"]   # as if cut short
  path.write_text(json.dumps(saved))
  runs = []

  def fake_launch(spec, mode, args, timeout, gpu=None):
    runs.append((mode, spec["label"], gpu))
    return _ok_result(spec)

  _run_main(monkeypatch, tmp_path, argv + ["--resume"], device_count=2, fake_launch=fake_launch)
  assert [(mode, label) for mode, label, _ in runs] == [("compile", "DiG-XL/2"), ("run", "DiG-XL/2")]
  merged = json.loads(path.read_text())["results"]
  assert len(merged) == 6 and merged[-1]["label"] == "DiG-XL/2" and merged[-1]["gpu"] in (0, 1)


def _worker_env_values(monkeypatch, name):
  """The list that each `launch` appends its worker's environment variable `name` to (no process starts)."""
  seen = []

  def fake_subprocess_run(cmd, env, **kw):
    seen.append(env.get(name))
    return subprocess.CompletedProcess(cmd, 1, "", "boom")

  monkeypatch.setattr(worker_process.subprocess, "run", fake_subprocess_run)
  return seen


def test_launch_lets_the_worker_see_only_its_gpu(monkeypatch):
  """`gpu` indexes the GPUs this process sees: CUDA_VISIBLE_DEVICES=4,6 and gpu=1 -> the worker's is 6."""
  seen = _worker_env_values(monkeypatch, "CUDA_VISIBLE_DEVICES")
  args = model_sweep.argparse.Namespace(steps=1, cache_dir="")
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  model_sweep.launch({}, "run", args, 1.0, gpu=1)
  model_sweep.launch({}, "run", args, 1.0)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
  assert model_sweep.launch({}, "run", args, 1.0, gpu=1)["status"] == "crash"
  assert seen == ["1", None, "6"]


def test_launch_gives_the_worker_its_own_xla_flags_without_touching_this_process(monkeypatch):
  seen = _worker_env_values(monkeypatch, "XLA_FLAGS")
  monkeypatch.setenv("XLA_FLAGS", "--base")
  args = model_sweep.argparse.Namespace(steps=1, cache_dir="")
  model_sweep.launch({}, "run", args, 1.0, xla_flags="--base --xla_gpu_autotune_level=0")
  model_sweep.launch({}, "run", args, 1.0)
  assert seen == ["--base --xla_gpu_autotune_level=0", "--base"]
  assert model_sweep.os.environ["XLA_FLAGS"] == "--base"


def test_launch_keeps_the_workers_xla_warnings(monkeypatch):
  """XLA's C++ log lines (absl format W/E/F + date) on a successful worker's stderr land in `xla_log`."""
  stderr = ("I1127 14:50:14.7 1 gpu.cc:1] info, not kept\n"
            "E1127 14:50:14.776038 2727 conv_algorithm_picker.cc:1] Results mismatch between algorithms\n"
            "Traceback-free python noise\nW1127 14:50:15.1 2 autotuner.cc:9] slow\n")
  outputs = iter([worker_process.RESULT_TAG + '{"status": "ok"}\n'] * 2)
  errors = iter([stderr, "no log lines\n"])
  monkeypatch.setattr(worker_process.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
      cmd, 0, next(outputs), next(errors)))
  args = model_sweep.argparse.Namespace(steps=1, cache_dir="")
  first = model_sweep.launch({}, "run", args, 1.0)
  assert [line.split()[0] for line in first["xla_log"]] == ["E1127", "W1127"]
  assert "Results mismatch" in first["xla_log"][0]
  assert "xla_log" not in model_sweep.launch({}, "run", args, 1.0)


def test_gpus_refuses_zero_repeats_no_precompilation_and_too_few_devices(monkeypatch, tmp_path):
  extra = ["--extra", "DiG-S/2:256:bf16"]
  for argv, message in ((["--gpus", "0"], "--gpus must be >= 1; got 0"),
                        (["--gpus", "2", "--jobs", "2", "--repeats", "2"], "pre-compilation.*no --repeats"),
                        (["--gpus", "2", "--jobs", "0"], "--gpus 2 needs pre-compilation")):
    with pytest.raises(SystemExit, match=message):
      _run_main(monkeypatch, tmp_path, extra + argv, device_count=2)
  with pytest.raises(SystemExit, match="--gpus 3: this process sees 2 gpu device.*needs 3 of one kind"):
    _run_main(monkeypatch, tmp_path, extra + ["--gpus", "3", "--jobs", "2"], device_count=2)
  with pytest.raises(SystemExit, match=r"sees 2 gpu device\(s\), \['NVIDIA H100', 'NVIDIA H200'\]"):
    _run_main(monkeypatch, tmp_path, extra + ["--gpus", "2", "--jobs", "2"], device_count=2,
              device_kinds=["NVIDIA H100", "NVIDIA H200"])
  assert not list(tmp_path.iterdir())     # nothing written


def test_worker_keeps_the_autotune_results_of_each_program(monkeypatch, tmp_path):
  """XLA rewrites the dump file after every compilation; the worker copies it right after each program's."""
  from benchmarks import sweep_worker
  dump = tmp_path / "at.textproto"
  monkeypatch.setenv("XLA_FLAGS", f"--xla_gpu_autotune_level=4 --xla_gpu_dump_autotune_results_to={dump}")
  out = {}
  sweep_worker.keep_autotune_results("train", out)           # nothing dumped yet: nothing kept
  assert out == {}
  dump.write_text("train step's results")
  sweep_worker.keep_autotune_results("train", out)
  dump.write_text("a later small compilation's")
  assert (tmp_path / "at.textproto.train").read_text() == "train step's results"
  assert out == {"autotune_results": {"train": f"{dump}.train"}}
  monkeypatch.setenv("XLA_FLAGS", "")
  sweep_worker.keep_autotune_results("forward", out)
  assert "forward" not in out["autotune_results"]
