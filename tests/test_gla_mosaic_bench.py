"""benchmarks/gla_mosaic.py end to end on CPU: the Triton kernels through the Pallas interpreter; Mosaic GPU
has no CPU interpreter for wgmma, so its kernels are replaced by the chunked reference (what is tested here is
the benchmark's plumbing: rows, errors, the JSON, a failing shape recorded without losing the others)."""
import dataclasses
import functools
import json
import sys

import jax.numpy as jnp

from benchmarks import gla_mosaic
from pallas_kernels.gla import gpu, reference


def _reference_forward(q, k, v, g, *, scale, segments=1, levels_fallback=True, raw_gate=False):
  log_gate = g if raw_gate else jnp.diff(g.reshape(g.shape[0], -1, 64, *g.shape[2:]), axis=2,
                                         prepend=0.0).reshape(g.shape)
  return reference.chunked_gla(q, k, v, log_gate, chunk_size=64, scale=scale).astype(jnp.bfloat16)


def test_gla_mosaic_benchmark_writes_table_and_json(monkeypatch, tmp_path, capsys):
  mosaic = gla_mosaic.gpu_mosaic
  monkeypatch.setattr(mosaic, "forward", _reference_forward)
  monkeypatch.setattr(mosaic, "state_pass", lambda k, v, g, segments: None)
  monkeypatch.setattr(mosaic, "out_pass", lambda q, k, v, g, hs, scale: _reference_forward(q, k, v, g,
                                                                                           scale=scale))
  config = gla_mosaic._config
  monkeypatch.setattr(gla_mosaic, "_config", lambda q, v: dataclasses.replace(config(q, v), interpret=True))
  monkeypatch.setattr(gla_mosaic.gpu, "gla", functools.partial(gpu.gla, interpret=True))
  monkeypatch.setattr(gla_mosaic, "copy_bandwidth", lambda: 1e12)
  calls = []
  monkeypatch.setattr(gla_mosaic, "time_calls",
                      lambda fn, sets, sync: calls.append(sync(fn(*sets[0]))) or 1e-3)
  monkeypatch.setattr(sys, "argv", ["gla_mosaic", "--out", str(tmp_path), "--shapes",
                                    "1,128,2,32,64;1,100,2,32,64", "--segments", "1", "--no_fallback",
                                    "--tag", "cpu_test"])
  gla_mosaic.main()
  result = json.loads((tmp_path / "gla_mosaic_cpu_cpu_test.json").read_text())
  (row,) = result["timings"]
  assert row["shape"] == dict(B=1, T=128, H=2, K=32, V=64)
  assert set(row["ms"]) == {"state_triton", "state_mosaic", "out_triton", "out_mosaic", "fwd_triton",
                            "fwd_mosaic_s1", "fwd_mosaic_s2", "fwd_nofallback_s2", "op_triton", "op_mosaic",
                            "op_mosaic_xla_cumsum", "op_mosaic_s1"}
  assert (row["segments"], row["mosaic_segments"]) == (1, 2)   # Triton's rule, and gpu.mosaic_segments
  assert len(calls) == len(row["ms"])
  assert max(row["errors"].values()) < 2e-2       # bf16 inputs; the stand-in is the reference itself
  (failure,) = result["failures"]                 # T = 100 is not a whole number of chunks
  assert failure["shape"] == [1, 100, 2, 32, 64]
  printed = capsys.readouterr().out
  assert "1, 128, 2, 32/64" in printed and "op mosaic (segments): tuned" in printed
