"""benchmarks/gla_gate.py end to end on CPU: both paths through the Pallas interpreter, timing stubbed."""
import json
import sys

from benchmarks import gla_gate


def test_gla_gate_benchmark_writes_table_and_json(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(gla_gate, "PATHS", gla_gate.paths(interpret=True))
  calls = []
  monkeypatch.setattr(gla_gate, "time_calls", lambda fn, sets, sync: calls.append(sync(fn(*sets[0]))) or 1e-3)
  monkeypatch.setattr(sys, "argv", ["gla_gate", "--out", str(tmp_path), "--shapes", "1,40,2,16,32,32,16",
                                    "--tag", "cpu_test"])
  gla_gate.main()
  result = json.loads((tmp_path / "gla_gate_cpu_cpu_test.json").read_text())
  (row,) = result["timings"]
  assert row["shape"] == dict(B=1, T=40, H=2, K=16, V=32, D=32, R=16)
  assert set(row["ms"]) == {"xla_gate", "fused_gate"} and len(calls) == 4
  assert set(row["errors"]) == {"o", "dq", "dk", "dv", "dx", "dw_down", "dw_up", "db_up"}
  assert max(row["errors"].values()) < 2e-2  # bf16 inputs, the same GLA kernels on both paths
  assert "1, 40, 2, 16/32, 32, 16" in capsys.readouterr().out
