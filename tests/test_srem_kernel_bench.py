"""benchmarks/srem_kernel.py end to end on CPU: the kernel through the Pallas interpreter, timing stubbed."""
import json
import sys

from benchmarks import srem_kernel


def test_srem_kernel_benchmark_writes_table_and_json(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(srem_kernel, "INTERPRET", True)
  calls = []
  monkeypatch.setattr(srem_kernel, "time_calls", lambda fn, sets, sync: calls.append(sync(fn(*sets[0]))) or 1e-3)
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
