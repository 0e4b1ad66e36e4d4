"""Test set-up: 8 fake CPU devices (before JAX initialises), no network, CPU only unless a GPU test asks.

DIG_TEST_GPU=1 on a GPU machine runs only the tests marked `gpu` (kernels compiled at real sizes).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Tests run on the CPU; GPU tests select the GPU explicitly and are skipped where none exists.
if os.environ.get("DIG_TEST_GPU") != "1":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), "_no_tfds_data"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


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
