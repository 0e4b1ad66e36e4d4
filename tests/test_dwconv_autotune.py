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


_RESULTS = '''version: 3
results {
  device: "CUDA: 9.0"
  hlo: "(bf16[32,16,16,384]{3,2,1,0}, u8[0]{0}) custom-call(), custom_call_target=\\"__cudnn$convForward\\""
  result {
    algorithm {
      algo_id: 5
      math_type: DEFAULT_MATH
    }
  }
}
results {
  device: "CUDA: 9.0"
  hlo: "(bf16[32,16,16,384]{3,2,1,0}) custom-call(), custom_call_target=\\"__cudnn$convForward\\""
  result {
    algorithm {
      math_type: DEFAULT_MATH
    }
  }
}
results {
  device: "CUDA: 9.0"
  hlo: "custom-call(), custom_call_target=\\"__cudnn$convBackwardFilter\\""
  result {
    algorithm {
      algo_id: 16
    }
  }
}
'''


def test_force_conv_algorithm_rewrites_forward_convs_only():
  text, changed = dwconv_autotune.force_conv_algorithm(_RESULTS, 0)
  assert changed == 2
  assert text.count("algo_id: 0") == 2 and "algo_id: 5" not in text and "algo_id: 16" in text
  back, changed = dwconv_autotune.force_conv_algorithm(text, 5)
  assert changed == 2 and back.count("algo_id: 5") == 2 and back.startswith("version: 3\nresults {")


def test_force_algorithm_command_line(monkeypatch, tmp_path):
  src, dst = tmp_path / "at.textproto.train", tmp_path / "edited.textproto"
  src.write_text(_RESULTS)
  _run(monkeypatch, ["--force_algorithm", "0", "--results", str(src), "--out", str(dst)])
  assert dst.read_text().count("algo_id: 0") == 2
  src.write_text(_RESULTS.split("results {")[0] + "results {" + _RESULTS.split("results {")[3])
  with pytest.raises(SystemExit, match="no cuDNN convForward entry.*entries: 1"):
    _run(monkeypatch, ["--force_algorithm", "0", "--results", str(src), "--out", str(tmp_path / "x")])
  assert not (tmp_path / "x").exists()
