"""benchmarks/compile_variance.py with the worker replaced (no GPU here); the worker's module dump on CPU."""
import gzip
import json

import pytest

from benchmarks import compile_variance, hlo_decisions, model_sweep, sweep_worker

_GEMM = ('  %custom-call.1 = (bf16[64,64]{{1,0}}, s8[8]{{0}}) custom-call(%a), custom_call_target='
         '"__cublas$lt$matmul", metadata={{op_name="jit(train_step)/mlp/dot_general"}}, '
         'backend_config={{"gemm_backend_config":{{"selected_algorithm":"{alg}"}}}}')


def test_variants_are_named_flags_and_typos_fail_clearly():
  assert compile_variance.parse_variants(["no_tune=--xla_gpu_autotune_level=0"]) == {
      "default": "", "no_tune": "--xla_gpu_autotune_level=0"}
  for bad in (["--xla_gpu_autotune_level=0"], ["x="], ["default=--a=1"], ["a b=--c=1"],
              ["a=--b=1", "a=--c=2"]):
    with pytest.raises(SystemExit, match="--variant"):
      compile_variance.parse_variants(bad)


def test_rounds_compare_the_fastest_and_slowest_compilation_and_keep_only_their_modules(
    monkeypatch, tmp_path):
  calls = []
  # Run order: DiG default, DiG tuned, DiT default, DiT tuned, then reversed, then forward again.
  speeds = iter([300.0, 100.0, 400.0, 120.0,   120.0, 410.0, 105.0, 90.0,   310.0, 95.0, 405.0, 118.0])

  def fake_launch(spec, mode, args, timeout, xla_flags):
    assert mode == "run" and args.cache_dir == ""        # every run compiles afresh
    calls.append((spec["label"], spec["hlo_prefix"].rsplit("_", 2)[-2:], xla_flags))
    speed = next(speeds)
    if speed == 95.0:  # a worker that wrote its modules and then died: no result, its files still go
      for which in ("train", "forward"):
        with gzip.open(f"{spec['hlo_prefix']}_{which}.txt.gz", "wt") as f:
          f.write(_GEMM.format(alg="0"))
      return dict(spec, status="crash", error="exit 1: boom")
    files = {}
    for which in ("train", "forward"):
      files[which] = f"{spec['hlo_prefix']}_{which}.txt.gz"
      with gzip.open(files[which], "wt") as f:
        f.write(_GEMM.format(alg="7" if speed > 200 else "0"))
    return dict(spec, status="ok", train_images_per_s=speed, forward_images_per_s=speed * 3,
                train_peak_bytes=2**30, hlo_files=files)

  monkeypatch.setattr(model_sweep, "launch", fake_launch)
  monkeypatch.setattr(model_sweep, "environment", lambda: dict(device_kind="NVIDIA H100 80GB HBM3"))
  monkeypatch.setenv("XLA_FLAGS", "--base")
  compile_variance.main(["--cells", "DiG-S/2:256:bf16,DiT-S/2:256:bf16:attention=cudnn", "--compiles", "3",
                         "--out_dir", str(tmp_path), "--variant", "tuned=--xla_gpu_autotune_level=0"])
  order = [(label, variant, r) for label, (variant, r), _ in calls]
  assert order[:4] == [("DiG-S/2", "default", "r0"), ("DiG-S/2", "tuned", "r0"),
                       ("DiT-S/2-cudnn", "default", "r0"), ("DiT-S/2-cudnn", "tuned", "r0")]
  assert order[4:8] == [(a, b, "r1") for a, b, _ in order[:4][::-1]]    # reversed every other round
  assert {c[2] for c in calls} == {"--base", "--base --xla_gpu_autotune_level=0"}
  assert compile_variance.os.environ["XLA_FLAGS"] == "--base"             # this process's flags untouched
  result = json.loads((tmp_path / "compile_variance_h100.json").read_text())
  dig, dig_tuned, dit, dit_tuned = result["groups"]
  assert dig["summary"]["train_images_per_s"]["values"] == [300.0, 90.0, 310.0]
  assert dig_tuned["summary"]["train_images_per_s"]["values"] == [100.0, 105.0]   # the crashed run: none
  assert dig_tuned["summary"]["ok"] == 2 and dig_tuned["summary"]["runs"] == 3
  extremes = dig["fastest_vs_slowest"]
  assert (extremes["fast_round"], extremes["slow_round"]) == (2, 1)
  assert extremes["train_ratio"] == pytest.approx(310 / 90)
  assert extremes["train"]["changed"][0]["first"] == "__cublas$lt$matmul: algorithm 7"
  assert extremes["forward"]["changed_by_category"] == {"cublas algorithm": 1}
  assert dit["fastest_vs_slowest"] is None                                # 410 / 400: under --keep_spread
  assert dig_tuned["fastest_vs_slowest"] is None and dit_tuned["fastest_vs_slowest"] is None
  kept = sorted(p.name for p in tmp_path.glob("*.txt.gz"))
  assert kept == [f"compile_variance_h100_c0_default_r{r}_{w}.txt.gz"
                  for r in (1, 2) for w in ("forward", "train")]
  log = (tmp_path / "compile_variance_h100.log").read_text()
  assert "3.44x in training" in log
  assert "default      training, median DiG-S/2 256 bf16 / DiT-S/2-cudnn 256 bf16: 0.741x" in log
  assert "tuned        training, median DiG-S/2 256 bf16 / DiT-S/2-cudnn 256 bf16: 0.854x" in log


def test_the_worker_writes_its_optimised_modules_when_asked(tmp_path):
  """A real (tiny) cell on CPU: both modules written, readable by hlo_decisions."""
  (spec,) = model_sweep.extra_cells("DiG-S/2:32:fp32:depth=1:hidden_size=64:num_heads=2:batch=2")
  spec["hlo_prefix"] = str(tmp_path / "cell")
  out = sweep_worker.run_worker(spec, "compile", steps=1)
  assert out["status"] == "ok", out.get("error")
  assert set(out["hlo_files"]) == {"train", "forward"}
  for path in out["hlo_files"].values():
    found = hlo_decisions.decisions(hlo_decisions.read_text(path))
    assert found and all(d.kind for d in found.values())
