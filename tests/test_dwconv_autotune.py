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


def test_force_conv_algorithm_rewrites_the_conv_entry_only():
  text, changed = dwconv_autotune.force_conv_algorithm(_RESULTS, 0)
  assert changed == 1
  assert text.count("algo_id: 0") == 1 and "algo_id: 5" not in text and "algo_id: 16" in text
  assert text.count("entries {") == 4 and text.count("backend: NATIVE_EMITTER") == 1
  back, changed = dwconv_autotune.force_conv_algorithm(text, 5, from_algorithm=0)
  assert changed == 1 and back == _RESULTS
  # proto3 text leaves an algorithm 0 out: such an entry counts as algorithm 0 and gets the line
  implicit = _RESULTS.replace("          algo_id: 5\n", "")
  forced, changed = dwconv_autotune.force_conv_algorithm(implicit, 7, from_algorithm=0)
  assert changed == 1 and "algo_id: 7" in forced and "algo_id: 16" in forced


def test_force_algorithm_command_line(monkeypatch, tmp_path, capsys):
  src, dst = tmp_path / "at.textproto.train", tmp_path / "edited.textproto"
  src.write_text(_RESULTS)
  _run(monkeypatch, ["--force_algorithm", "0", "--results", str(src), "--out", str(dst)])
  assert dst.read_text().count("algo_id: 0") == 1
  assert "1 cuDNN entries of algorithm 5 -> 0" in capsys.readouterr().out
  refusal = r"no cuDNN entry of algorithm 3 \(entries: 4, cuDNN algorithms: \[5, 16\]\)"
  with pytest.raises(SystemExit, match=refusal):
    _run(monkeypatch, ["--force_algorithm", "0", "--from_algorithm", "3", "--results", str(src),
                       "--out", str(tmp_path / "x")])
  assert not (tmp_path / "x").exists()


# Four entries in the layout jaxlib 0.11.2 dumps (H100, session 16; fingerprints shortened): a fusion, the
# depthwise conv's forward (cuDNN algorithm 5), a cuBLAS GEMM and the conv's backward filter (16).
_ENTRY = """entries {
  key {
    target {
      device: "699b92c0fb30cb16"
      hlo_fingerprint: "%s"
    }
    environment {
      codegen_version: "fe9062d0fff82a66"
    }
  }
  value {
    optimal_config {
%s
    }
    optimal_backend_version: "%s"
  }
}
"""
_CUDNN = """      backend: CUDNN
      backend_config {
        algorithm {
          algo_id: %d
          workspace_size {%s
          }
        }
      }"""
_RESULTS = "".join([
    _ENTRY % ("0226076c", "      backend: NATIVE_EMITTER\n      backend_config {\n        native_emitter {\n"
              "        }\n      }", "v1"),
    _ENTRY % ("1f7c70d9", _CUDNN % (5, ""), "9.19.0"),
    _ENTRY % ("30843f27", "      backend: CUBLASLT_FISSION\n      backend_config {\n          algorithm: 3\n"
              "      }", "v1"),
    _ENTRY % ("4da51b8a", _CUDNN % (16, "\n            value: 3538944"), "9.19.0"),
])
