"""One readable line, not a traceback, for the errors dig-jax raises on bad input at its command lines.

The library raises ordinary exceptions with messages that say what to do (a missing data folder, a workdir
without checkpoints, a latent config before the VAE exists, a mesh that does not fit, an out-of-memory step).
At a command line those messages sit under 20 lines of traceback; `exit_on_input_error` wraps an absl `main`
so that they print as ``FATAL <Type>: <message>`` with exit status 1. The traceback is still logged at DEBUG
level (shown with ``--verbosity=1``), so a real bug stays debuggable. Other exception types (TypeError,
KeyError, ...) keep their traceback: they point at code, not at input.
"""
from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

INPUT_ERRORS = (FileNotFoundError, NotImplementedError, ValueError, RuntimeError, FloatingPointError)


def exit_on_input_error(main: Callable[[Sequence[str]], Any]) -> Callable[[Sequence[str]], Any]:
  """`main` for `absl.app.run`, reporting INPUT_ERRORS in one line (exit 1)."""
  @functools.wraps(main)
  def wrapped(argv: Sequence[str]) -> Any:
    try:
      return main(argv)
    except INPUT_ERRORS as e:
      logging.debug("%s", traceback.format_exc())
      sys.stderr.write(f"FATAL {type(e).__name__}: {e}\n(rerun with --verbosity=1 for the traceback)\n")
      sys.exit(1)
  return wrapped
