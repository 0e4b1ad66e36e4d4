"""The resolution-sweep script's pure parts (benchmarks/model_sweep.py): cell specs and the repeat summary."""
from benchmarks import model_sweep


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
