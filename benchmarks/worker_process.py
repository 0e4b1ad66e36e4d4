"""The fresh-process protocol of the benchmark scripts that measure each cell in its own subprocess.

`model_sweep` (worker side: `sweep_worker`) and `dwconv_autotune` run ``python -m <their module> --worker
SPEC ...`` from the repository root, so each measurement has its own process (its own peak memory, its own
compilation, its own XLA autotuning); the worker prints its result as one ``RESULT {json}`` line
(`emit_result`), and `run_worker` parses it. What a missing result means (timeout, crash, out of memory) is
each caller's to say. `xla_log_lines` picks XLA's own warnings out of a worker's stderr.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any, NamedTuple

RESULT_TAG = "RESULT "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_XLA_LOG_LINE = re.compile(r"^[EWF]\d{4} ")


def xla_log_lines(stderr: str, limit: int = 12, width: int = 300) -> list[str]:
  """The absl-format warning / error / fatal lines (XLA's C++ log, e.g. the autotuner's "Results mismatch
  between different convolution algorithms") of a worker's stderr: the first `limit`, cut to `width`."""
  return [line[:width] for line in stderr.splitlines() if _XLA_LOG_LINE.match(line)][:limit]


def emit_result(result: dict[str, Any]) -> None:
  """The worker's side: its result, as the one line `run_worker` looks for."""
  print(RESULT_TAG + json.dumps(result), flush=True)


class WorkerRun(NamedTuple):
  result: dict[str, Any] | None   # the worker's RESULT line, parsed; None if it printed none or timed out
  timed_out: bool
  returncode: int | None
  stdout: str
  stderr: str


def run_worker(module: str, spec: dict[str, Any], extra_args: list[str], env: dict[str, str],
               timeout: float) -> WorkerRun:
  """Runs ``python -m module --worker json(spec) *extra_args`` from the repository root with `env`."""
  cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec), *extra_args]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
  except subprocess.TimeoutExpired:
    return WorkerRun(None, True, None, "", "")
  result = next((json.loads(line[len(RESULT_TAG):]) for line in proc.stdout.splitlines()
                 if line.startswith(RESULT_TAG)), None)
  return WorkerRun(result, False, proc.returncode, proc.stdout, proc.stderr)
