"""benchmarks/dwconv_autotune.py: its command line, the per-variant summary, and one real run on the CPU
(fresh worker processes compiling the conv; no cuDNN there, so no algorithms are listed)."""
import json
import sys

import pytest

from benchmarks import dwconv_autotune


def _run(monkeypatch, argv):
  monkeypatch.setattr(sys, "argv", ["dwconv_autotune", *argv])
  dwconv_autotune.main()


@pytest.mark.parametrize("argv,message", [
    (["--variants", "default,winograd"], "unknown \\['winograd'\\]"),
    (["--variants", ","], "unknown \\[\\]"),
    (["--shapes", "32,16,16"], "expected 'N,H,W,D"),
    (["--shapes", "32,16,x,384"], "expected 'N,H,W,D"),
])
def test_bad_command_lines_are_refused(monkeypatch, tmp_path, argv, message):
  with pytest.raises(SystemExit, match=message):
    _run(monkeypatch, argv + ["--out_dir", str(tmp_path)])
  assert not list(tmp_path.iterdir())


def test_summary_counts_algorithm_sets_and_mismatch_runs():
  ok = dict(status="ok", forward_algorithms={"__cudnn$convForward: algo_id 5": 1},
            train_algorithms={"__cudnn$convForward: algo_id 5": 2}, forward_ms=0.1, train_ms=0.3, xla_log=[])
  slow = dict(ok, forward_algorithms={"__cudnn$convForward: algo_id 0": 1}, forward_ms=0.4,
              xla_log=["E1127 conv_algorithm_picker.cc] Results mismatch between different algorithms"])
  summary = dwconv_autotune.summarize([ok, ok, slow, dict(status="crash", xla_log=["F1127 boom"])])
  assert (summary["runs"], summary["ok"], summary["runs_with_log"], summary["mismatch_runs"]) == (4, 3, 2, 1)
  assert list(summary["algorithm_sets"].values()) == [2, 1]
  assert summary["forward_ms"] == [0.1, 0.1, 0.4]


def test_one_real_run_per_variant_writes_the_json(monkeypatch, tmp_path):
  _run(monkeypatch, ["--shapes", "1,4,5,8", "--runs", "1", "--variants", "default,taps",
                     "--out_dir", str(tmp_path), "--tag", "t"])
  result = json.loads((tmp_path / "dwconv_autotune_cpu_t.json").read_text())
  assert [(r["variant"], r["status"]) for r in result["runs"]] == [("default", "ok"), ("taps", "ok")]
  for run in result["runs"]:
    assert run["forward_ms"] > 0 and run["train_ms"] > 0 and run["forward_algorithms"] == {}
  assert [s["variant"] for s in result["summary"]] == ["default", "taps"]
