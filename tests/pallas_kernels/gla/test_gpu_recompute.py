"""Tests of the recomputed-states mode of the GPU GLA kernels (`pallas_kernels.gla.gpu_recompute`).

`KernelConfig.states="recompute"`: no state passes; the output, dv and dq/dk/dG kernels form their chunk's
h_n / D_n from whole-sequence blocks. On CPU through the Pallas interpreter (`interpret=True`), forward and
all four gradients against `reference.chunked_gla` with `test_gpu_kernel`'s helper and tolerances (fp32 2e-5,
bf16 1.5e-2): 1, 2 and 4 chunks, T not a multiple of the chunk, K 32 and 64 (the dq/dk/dG kernel over two K
tiles of 32; the output and dv kernels over K tiles and V tiles), both loops ("masked", "dynamic"), and the
low-rank gate path once. Most runs take mild gates (|g| <= 0.05 per step: a chunk of 64 decays by ~e^-0.35,
so every earlier chunk reaches h_n and every later one D_n; with `random_inputs`' default gates, up to 10
per step, only the previous chunk would); the padded runs take the default ones (the levels' fallback).
Also: recompute and stored states agree (fp32), the config checks, `tuned_config`'s choice, and the Triton
lowering for an H100 (3 kernels per forward+backward, 1 per forward).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gla import gpu
from tests.pallas_kernels.gla import test_gpu_gate, test_gpu_kernel
from tests.pallas_kernels.gla.gla_test_utils import fresh_rng, rel_err, target_h100_for_triton_lowering

RECOMPUTE = gpu.KernelConfig(states="recompute")
MILD, DEFAULT = (1e-3, 0.05), (1e-3, 10.0)
K64 = dict(grad_block_k=32)  # dq/dk/dG over two K tiles
TILES = dict(grad_block_k=32, score_block_k=32, fwd_block_v=32)  # + K tiles in the output/dv loops, V tiles

# id: (B, T, H, K, V), dtype, chunk, KernelConfig overrides, gates. T <= chunk: the reference runs chunks of
# 16 (jitted XLA:CPU on a single chunk is unreliable, NOTES.md).
CASES = {
    "fp32_1chunk_k32": ((1, 64, 2, 32, 64), jnp.float32, 64, {}, MILD),
    "fp32_2chunks_k64_dynamic": ((1, 128, 1, 64, 64), jnp.float32, 64, dict(K64, recompute_loop="dynamic"),
                                 MILD),
    "bf16_2chunks_k32": ((1, 128, 2, 32, 64), jnp.bfloat16, 64, {}, MILD),
    "bf16_4chunks_k32": ((1, 256, 2, 32, 64), jnp.bfloat16, 64, {}, MILD),
    "fp32_4chunks_k32_dynamic": ((1, 256, 1, 32, 64), jnp.float32, 64, dict(recompute_loop="dynamic"), MILD),
    "fp32_padded_k64": ((1, 200, 1, 64, 64), jnp.float32, 64, K64, DEFAULT),
    "bf16_padded_k32_dynamic": ((1, 200, 1, 32, 64), jnp.bfloat16, 64, dict(recompute_loop="dynamic"),
                                DEFAULT),
    "fp32_chunk16_k64_tiles": ((1, 64, 1, 64, 64), jnp.float32, 16, TILES, MILD),
    "bf16_chunk16_k64_tiles_dynamic": ((1, 64, 1, 64, 64), jnp.bfloat16, 16,
                                       dict(TILES, recompute_loop="dynamic"), MILD),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interpret_recompute_matches_reference(case):
  shape, dtype, chunk, overrides, gates = CASES[case]
  config = dataclasses.replace(RECOMPUTE, **overrides)
  test_gpu_kernel._check(shape, dtype, chunk, config, interpret=True, gates=gates,
                         ref_chunk=16 if shape[1] <= chunk else None)


def test_interpret_recompute_agrees_with_stored_states():
  """fp32: the same inputs through stored states (state passes) and recomputed ones; 4 chunks, the last
  padded, mild gates. (Both loops are checked against the reference above.)"""
  _, seed = fresh_rng()
  stored, recomputed = (
      test_gpu_kernel._check((1, 200, 2, 32, 64), jnp.float32, 64, config, interpret=True,
                             seed_rng=(np.random.default_rng(seed), seed), gates=MILD)
      for config in (gpu.KernelConfig(), RECOMPUTE))
  for out, a, b in zip(("o", "dq", "dk", "dv", "dg"), recomputed, stored):
    assert rel_err(a, b) < 2e-6, (out, rel_err(a, b), seed)


def test_interpret_recompute_through_the_low_rank_gate():
  # T = 50 with chunk 16: 4 chunks, the last padded; fp32 everything (tolerance 2e-5, as test_gpu_gate's).
  test_gpu_gate._compare((1, 50, 2, 16, 32, 48, 16), jnp.float32, "float32", 16, 2e-5, config=RECOMPUTE)


def test_config_checks_and_tuned_choice():
  x = jnp.zeros((1, 20, 1, 16))
  for bad, match in ((dict(states="none"), "states"), (dict(recompute_loop="scan"), "recompute_loop"),
                     (dict(fused=True), "fused=False"), (dict(state_segments=2), "state_segments=1"),
                     (dict(grad_version=1), "grad_version=2")):
    with pytest.raises(ValueError, match=match):
      gpu.gla(x, x, x, x, interpret=True, config=dataclasses.replace(RECOMPUTE, **bad))
  # Not the default: tuned_config is unchanged unless asked (DiG-S/2 at 256 px: B=32, T=256, 4 chunks).
  assert not gpu.RECOMPUTE_DEFAULT
  dig_q, dig_v = (32, 256, 6, 32), (32, 256, 6, 64)
  assert gpu.tuned_config(dig_q, dig_v).states == "stored"
  asked = gpu.tuned_config(dig_q, dig_v, recompute_states=True)
  assert asked == dataclasses.replace(gpu.tuned_config(dig_q, dig_v), states="recompute")
  few = gpu.tuned_config((8, 256, 6, 32), (8, 256, 6, 64), recompute_states=True)  # fused when stored
  assert (few.states, few.fused, few.state_segments) == ("recompute", False, 1)
  chunks = gpu.RECOMPUTE_MAX_CHUNKS * 64
  assert gpu.tuned_config((32, chunks, 6, 32), dig_v, recompute_states=True).states == "recompute"
  assert gpu.tuned_config((32, chunks + 1, 6, 32), dig_v, recompute_states=True).states == "stored"


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("loop", ["masked", "dynamic"])
def test_recompute_lowers_to_triton_for_h100(monkeypatch, loop):
  """Forward+backward in 3 Triton kernels (output, dv, dq/dk/dG), a forward in 1; DiG's 32/64 in bf16 and
  64/64 fp32 over K tiles, T = 200 (4 chunks of 64, padded)."""
  target_h100_for_triton_lowering(monkeypatch)
  for (dk, dv), dtype, tiles in (((32, 64), jnp.bfloat16, {}), ((64, 64), jnp.float32, TILES)):
    config = dataclasses.replace(RECOMPUTE, recompute_loop=loop, **tiles)
    args = [jax.ShapeDtypeStruct((2, 200, 3, d), dtype) for d in (dk, dk, dv)]
    args.append(jax.ShapeDtypeStruct((2, 200, 3, dk), jnp.float32))
    op = lambda *a: gpu.gla(*a, config=config)
    loss = lambda *a: op(*a).astype(jnp.float32).sum()
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 3
    assert jax.jit(op).trace(*args).lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton") == 1


# ------------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("loop", ["masked", "dynamic"])
@pytest.mark.parametrize("shape,dtype,gates", [
    ((32, 256, 6, 32, 64), jnp.bfloat16, MILD),     # DiG-S/2 at 256 px: 4 chunks of 64
    ((32, 256, 6, 32, 64), jnp.float32, DEFAULT),
    ((8, 500, 6, 64, 64), jnp.bfloat16, MILD),      # 8 chunks, the last padded; dq/dk/dG over K tiles
    ((4, 200, 3, 64, 64), jnp.float32, DEFAULT)])
def test_gpu_recompute_matches_reference(shape, dtype, gates, loop):
  config = dataclasses.replace(RECOMPUTE, recompute_loop=loop, **(K64 if shape[3] == 64 else {}))
  test_gpu_kernel._check(shape, dtype, None, config, interpret=False, gates=gates)
