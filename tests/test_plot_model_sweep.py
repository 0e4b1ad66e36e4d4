"""benchmarks/plot_model_sweep.py: a small sweep file plots; suspect cells are named under the row's title."""
import json

import pytest

from benchmarks import plot_model_sweep


def _cell(label, px, speed, **extra):
  return dict(label=label, px=px, batch=2, precision="bf16", status="ok", train_images_per_s=speed,
              train_peak_bytes=2**30, **extra)


def test_plots_a_sweep_and_names_the_suspect_cells(tmp_path):
  pytest.importorskip("matplotlib")
  results = [_cell("DiG-S/2", 256, 100.0), _cell("DiG-S/2", 512, 40.0, suspect="timed during compilation"),
             _cell("DiT-S/2-cudnn", 256, 120.0), _cell("DiT-S/2-cudnn", 512, 30.0),
             dict(label="DiT-S/2-xla", px=512, batch=2, precision="bf16", status="oom")]
  assert plot_model_sweep.suspect_reasons(results) == ["timed during compilation"]
  assert plot_model_sweep.suspect_reasons(results[2:]) == []
  path = tmp_path / "sweep.json"
  path.write_text(json.dumps(dict(environment=dict(device_kind="NVIDIA H200"), batch_sizes={"256": 2, "512": 2},
                                  results=results)))
  png = tmp_path / "sweep.png"
  plot_model_sweep.main(str(path), str(png))
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
