"""The command lines report bad input in one line (dig_jax/cli_errors.py), and keep tracebacks for bugs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dig_jax.cli_errors import exit_on_input_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_input_errors_become_one_fatal_line_and_exit_1(capsys):
  def main(argv):
    raise FileNotFoundError(f"no data under {argv[1]}; pass --config.input.data_dir")
  with pytest.raises(SystemExit) as exit_info:
    exit_on_input_error(main)(["prog", "/nowhere"])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("FATAL FileNotFoundError: no data under /nowhere; pass --config.input.data_dir\n")
  assert "Traceback" not in err


def test_other_errors_keep_their_traceback():
  def main(argv):
    del argv
    raise TypeError("a bug, not bad input")
  with pytest.raises(TypeError, match="a bug"):
    exit_on_input_error(main)(["prog"])


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=180, check=False)


def test_sample_cli_on_a_folder_that_is_no_workdir(tmp_path):
  result = _run("dig_jax.sample", f"--workdir={tmp_path}")
  assert result.returncode == 1
  assert "FATAL FileNotFoundError:" in result.stderr and "config.json not found" in result.stderr
  assert "Traceback" not in result.stderr


def test_main_cli_on_a_latent_config_before_the_vae(tmp_path):
  result = _run("dig_jax.main", "--config=configs/xl2.py:runlocal=True", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert "FATAL NotImplementedError:" in result.stderr and "config.latent.vae" in result.stderr
  assert "Traceback" not in result.stderr
