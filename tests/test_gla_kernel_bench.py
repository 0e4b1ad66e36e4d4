"""The GLA benchmark script's pure parts (benchmarks/gla_kernel.py, benchmarks/bench_common.py)."""
import dataclasses

import pytest

from benchmarks import bench_common, gla_kernel
from pallas_kernels.gla import gpu


def test_variant_presets_build_valid_kernel_configs():
  # Every preset names real KernelConfig fields with values the op accepts (a renamed field breaks this).
  for name in gla_kernel.VARIANT_PRESETS:
    variants = gla_kernel.parse_variants(name)
    assert variants, name
    for overrides, chunk in variants.values():
      config = dataclasses.replace(gpu.tuned_config((1, 4096, 2, 32), (1, 4096, 2, 64)), **overrides)
      gpu._check_config(config)
      assert chunk is None or chunk in (16, 32, 64, 128)


def test_parse_variants_types_and_errors():
  variants = gla_kernel.parse_variants("a=fused:false,warps_out:8,gate_cumsum:matmul,chunk:32;b=")
  assert variants == {"a": ({"fused": False, "warps_out": 8, "gate_cumsum": "matmul"}, 32), "b": ({}, None)}
  with pytest.raises(ValueError, match="not a KernelConfig field"):
    gla_kernel.parse_variants("a=fusd:true")
  with pytest.raises(ValueError, match="empty"):
    gla_kernel.parse_variants(";")


def test_card_slug():
  assert bench_common.card_slug("NVIDIA H100 80GB HBM3") == "h100"
  assert bench_common.card_slug("NVIDIA H200") == "h200"
  assert bench_common.card_slug("TPU v5 lite") == "tpu_v5_lite"
