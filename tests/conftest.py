"""Test set-up: 8 fake CPU devices (before JAX initialises), no network, CPU only unless a GPU test asks,
one compilation cache per pytest run (shared by pytest-xdist workers), CPU compiles at XLA's backend
optimisation level 0.

DIG_TEST_GPU=1 on a GPU machine runs only the tests marked `gpu` (kernels compiled at real sizes).
"""
import os

# CPU runs set XLA:CPU's backend optimisation level to 0: compiling dominates this suite, and on a 2-core
# machine that took `make test`'s pytest from 7.2 to 4.2-4.9 minutes (session 13; the programs run
# slower, the compiles much faster). The tests check values, not speed; the generated code may round
# differently in the last bits, within every test's tolerance (the whole suite passes either way).
# XLA_FLAGS set in the environment replace these defaults.
_FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
# Tests run on the CPU; GPU tests select the GPU explicitly and are skipped where none exists.
if os.environ.get("DIG_TEST_GPU") != "1":
  os.environ.setdefault("XLA_FLAGS", _FAKE_DEVICES + " --xla_backend_optimization_level=0")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
else:
  os.environ.setdefault("XLA_FLAGS", _FAKE_DEVICES)
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), "_no_tfds_data"))

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

# Compiling dominates the suite's time on a 2-core CPU, and some tests compile a program that an earlier one
# compiled through another jax.jit (the same train step in two training runs, the same kernel config in
# several checks): JAX's persistent compilation cache turns those compiles into loads. It is a new temporary
# directory per pytest run, removed at exit, so every run (and CI) starts cold; pytest-xdist's workers share
# their controller's (it creates the directory before starting them, passes it in the environment and removes
# it after they have ended). A cache directory that is already configured (JAX_COMPILATION_CACHE_DIR) is used
# as it is.
_SHARED_CACHE_ENV = "DIG_TEST_XLA_CACHE_DIR"
if not jax.config.jax_compilation_cache_dir:
  if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_SHARED_CACHE_ENV):
    _XLA_CACHE_DIR = os.environ[_SHARED_CACHE_ENV]
  else:
    _XLA_CACHE_DIR = tempfile.mkdtemp(prefix="dig-jax-tests-xla-cache-")
    os.environ[_SHARED_CACHE_ENV] = _XLA_CACHE_DIR
    atexit.register(shutil.rmtree, _XLA_CACHE_DIR, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", _XLA_CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if os.environ.get("DIG_TEST_GPU") == "1":
    # A GPU run: JAX's default backend is the GPU, so the CPU tests (8 fake CPU devices, exact fp32 matmuls
    # where the GPU would use TF32) do not apply; they run in the plain CPU suite.
    skip_cpu = pytest.mark.skip(reason="CPU test (8 fake CPU devices); run it without DIG_TEST_GPU=1")
    for item in items:
      if "gpu" not in item.keywords:
        item.add_marker(skip_cpu)
  if _has_gpu():
    return
  skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (run with DIG_TEST_GPU=1 on a GPU machine)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip_gpu)
