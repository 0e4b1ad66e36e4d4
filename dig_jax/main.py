"""Entry point: ``python -m dig_jax.main [--config=configs/demo.py] [--workdir=DIR] [--config.a.b=v ...]``.

Thin on purpose (flax examples' main.py): flags, optional multi-process start-up, then
``train.train_and_evaluate(config, workdir)``. The config file is loaded with ``lock_config=True``, so
overriding a field that does not exist fails with one error naming it. Without ``--config`` the embedded-MNIST
demo runs; without ``--workdir`` it writes to ``./workdir/<config file name>``. A config file may take an
argument after a colon: ``--config=configs/xl2.py:runlocal=True``. Run from the repository root (or with the
package installed); ``configs/`` is found beside the package either way.

Multi-process (several hosts, or one process per GPU): pass ``--multihost`` or set ``DIG_JAX_DISTRIBUTED=1``;
``jax.distributed.initialize()`` then auto-detects Cloud TPU, SLURM and Open MPI (or reads
``JAX_COORDINATOR_ADDRESS`` etc.). It must run before anything touches a JAX backend, which is why it is here.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys
from collections.abc import Sequence

# `configs` is a top-level folder beside the package: make it importable whatever the working directory.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dig_jax import train  # noqa: E402
from dig_jax.cli_errors import exit_on_input_error  # noqa: E402

DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs", "demo.py")

_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go "
                               "(default: ./workdir/<config file name>). An existing run there is resumed.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (also if "
                               "DIG_JAX_DISTRIBUTED=1).")
_CONFIG_FLAG = "config"


def define_config_flag(argv: list[str]) -> flags.FlagHolder:
  """Defines --config; without one in `argv`, inserts --config=<demo> so overrides parse (and fail) normally.

  ml_collections parses a *default* config file while the flag is defined, where a bad override would escape
  as a traceback; given explicitly, it is parsed with the other flags, where `parse_flags` reports it.
  """
  if not any(re.match(rf"^--?{_CONFIG_FLAG}(=|$)", arg) for arg in argv[1:]):
    argv.insert(1, f"--{_CONFIG_FLAG}={DEFAULT_CONFIG}")
  return config_flags.DEFINE_config_file(_CONFIG_FLAG, default=DEFAULT_CONFIG,
                                         help_string="Training config file.", lock_config=True)


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":", 1)[0]))[0]
  return os.path.join("workdir", name)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with one readable line (no traceback) for a bad ``--config.*`` override."""
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpfull to see help on flags.\n")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    overrides = [arg.split("=", 1)[0].lstrip("-") for arg in argv if arg.lstrip("-").startswith("config.")]
    sys.stderr.write(f"FATAL Bad config override ({type(e).__name__}: {e}) among {overrides}: each "
                     "--config.a.b=value must name an existing field of the config file (configs are locked) "
                     "with a value of that field's type.\n")
  sys.exit(1)


class _QuietOrbaxInfo(pylogging.Filter):
  """Orbax logs every save step by step at INFO; keep its warnings and errors only."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbaxInfo())
  jax.config.update("jax_threefry_partitionable", True)
  if _MULTIHOST.value or os.environ.get("DIG_JAX_DISTRIBUTED", "") in ("1", "true", "True"):
    jax.distributed.initialize()
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS[_CONFIG_FLAG]))
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s).", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  logging.info("Workdir: %s", os.path.abspath(workdir))
  metrics = train.train_and_evaluate(flags.FLAGS[_CONFIG_FLAG].value, workdir)
  logging.info("Finished: %s", metrics)


if __name__ == "__main__":
  define_config_flag(sys.argv)
  app.run(exit_on_input_error(main), flags_parser=parse_flags)
