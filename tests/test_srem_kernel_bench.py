"""benchmarks/srem_kernel.py end to end on CPU: the kernel through the Pallas interpreter, timing stubbed."""
import json
import sys

from benchmarks import srem_kernel


def test_srem_kernel_benchmark_writes_table_and_json(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(srem_kernel, "INTERPRET", True)
  calls = []
  monkeypatch.setattr(srem_kernel, "time_calls",
                      lambda fn, sets, sync: calls.append(sync(fn(*sets[0]))) or 1e-3)
  monkeypatch.setattr(sys, "argv", ["srem_kernel", "--out", str(tmp_path), "--shapes", "2,3,5,24,2",
                                    "--tag", "cpu_test"])
  srem_kernel.main()
  result = json.loads((tmp_path / "srem_kernel_cpu_cpu_test.json").read_text())
  (row,) = result["timings"]
  assert row["shape"] == dict(N=2, rows=3, cols=5, D=24, reorient="flip_transpose")
  assert set(row["ms"]) == {"taps", "conv", "pallas"} and len(calls) == 6
  for errors in row["errors"].values():
    assert set(errors) == {"out", "dx", "dkernel", "dbias"}
    assert max(errors.values()) < 2e-2  # bf16 inputs against the fp32 reference
  assert "2, 3x5, 24, flip_transpose" in capsys.readouterr().out


def test_tile_sweep_times_every_config_and_restores_the_default(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(srem_kernel, "INTERPRET", True)
  monkeypatch.setattr(srem_kernel, "TILE_CONFIGS", (((16, 16, 4), (16, 16, 4)), ((32, 16, 2), (16, 32, 2))))
  monkeypatch.setattr(srem_kernel, "CHAIN_DEPTH", 2)  # flip, then flip_transpose (the grid turns)
  seen = []

  def fake_time(fn, sets, sync):
    seen.append((srem_kernel.gpu.FORWARD_CONFIG, srem_kernel.gpu.BACKWARD_CONFIG))
    value, grads = fn(*sets[0])
    assert all(g.shape == a.shape for g, a in zip(grads, sets[0]))
    return 2e-3
  monkeypatch.setattr(srem_kernel, "time_calls", fake_time)
  default = (srem_kernel.gpu.FORWARD_CONFIG, srem_kernel.gpu.BACKWARD_CONFIG)
  monkeypatch.setattr(sys, "argv", ["srem_kernel", "--out", str(tmp_path), "--shapes", "1,3,5,16,0",
                                    "--tile_sweep"])
  srem_kernel.main()
  assert seen == [((16, 16, 4), (16, 16, 4)), ((32, 16, 2), (16, 32, 2))]
  assert (srem_kernel.gpu.FORWARD_CONFIG, srem_kernel.gpu.BACKWARD_CONFIG) == default
  (row,) = json.loads((tmp_path / "srem_kernel_tiles_cpu.json").read_text())["timings"]
  assert row["ms_per_block"] == {"fwd (16, 16, 4) bwd (16, 16, 4)": 1.0,
                                 "fwd (32, 16, 2) bwd (16, 32, 2)": 1.0}
  assert "1, 3x5, 16: fwd+bwd ms per block (2 in a row)" in capsys.readouterr().out
