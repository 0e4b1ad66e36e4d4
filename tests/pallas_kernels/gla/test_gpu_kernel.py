"""Tests of the Pallas GPU GLA kernels (`pallas_kernels.gla.gpu`).

On CPU the kernel bodies run through the Pallas interpreter (`interpret=True`) on tiny shapes: forward and all
four gradients (q, k, v, log gate) against `reference.chunked_gla`, fresh random inputs every run (seed in the
failure message), T not a multiple of the chunk, gates -|g| with |g| log-uniform in [1e-3, 10] per step. A
lowering test turns the kernels into Triton IR for an H100 target without a GPU. Tests marked `gpu` run the
compiled kernels at real sizes (DIG_TEST_GPU=1 on a GPU machine).

Tolerances (relative Frobenius error against the reference on the same inputs, upcast to fp32, HIGHEST
precision): fp32 inputs 2e-5 (the kernels use fp32 operands and IEEE fp32 dots; measured ~1e-7 on CPU and
H100); bf16 inputs 1.5e-2 (bf16 matmul operands, like fla; measured 2-3e-3 for o, dq, dk, dv and up to 7e-3
for the gate gradient).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gla import gpu, gpu_kernels, reference
from tests.pallas_kernels.gla.gla_test_utils import (fresh_rng, random_inputs, rel_err,
                                                      target_h100_for_triton_lowering)

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}


def _fwd_and_grads(fn, q, k, v, g, do):
  def run(q, k, v, g, do):
    o, vjp = jax.vjp(fn, q, k, v, g)
    return (o, *vjp(do))
  return jax.jit(run)(q, k, v, g, do)


@functools.partial(jax.jit, static_argnames="chunk")
def _reference_fwd_and_grads(q, k, v, g, do, chunk):
  """The reference's output and gradients (fp32, HIGHEST), one jitted function for the module: tests that
  check several configs, dtypes or gate ranges on one shape compile it once per shape and chunk, not once per
  check. (The kernels still compile per call: some tests patch a constant that they read at trace time.)"""
  def fn(*args):
    return reference.chunked_gla(*args, chunk_size=chunk, precision=jax.lax.Precision.HIGHEST)
  o, vjp = jax.vjp(fn, q, k, v, g)
  return (o, *vjp(do))


def _check(shape, dtype, chunk, config, interpret, seed_rng=None, gates=(1e-3, 10.0)):
  rng, seed = seed_rng or fresh_rng()
  b, t, h, dk, dv = shape
  q, k, v, g = random_inputs(rng, b, t, h, dk, dv, *gates)
  do = rng.standard_normal((b, t, h, dv)).astype("float32")
  q, k, v, do = (jnp.asarray(x, dtype) for x in (q, k, v, do))
  got = _fwd_and_grads(lambda *a: gpu.gla(*a, chunk_size=chunk, interpret=interpret, config=config),
                       q, k, v, g, do)
  up = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, do)]
  want = _reference_fwd_and_grads(*up, chunk=chunk or 64)
  assert got[0].dtype == dtype and got[0].shape == (b, t, h, dv)
  for name, a, r in zip(("o", "dq", "dk", "dv", "dg"), got, want):
    assert a.shape == r.shape, name
    err = rel_err(jnp.asarray(a, jnp.float32), r)
    assert err < TOL[dtype], (name, err, seed, shape, dtype, config, gates)
  return got


# ------------------------------------------------------------------------------------------- interpret (CPU)


def test_interpret_fp32_fused_forward_k32_v64():
  # T = 40 with chunk 16: 3 chunks, the last one padded; the tuned config takes the fused forward here.
  assert gpu.tuned_config((1, 40, 2, 32), (1, 40, 2, 64)).fused
  _check((1, 40, 2, 32, 64), jnp.float32, 16, None, interpret=True)


def test_interpret_bf16_two_pass_forward_k64_v64():
  config = gpu.KernelConfig(fused=False, prefetch=True, state_block_k=16, state_block_v=32, grad_block_v=32)
  _check((1, 45, 2, 64, 64), jnp.bfloat16, 16, config, interpret=True)


def test_interpret_bf16_k_tiled_kernels_k64_v64():
  # K contracted in tiles of 32 by the output and dv kernels (two V tiles), dq/dk/dG gridded over two K tiles.
  config = gpu.KernelConfig(fused=False, score_block_k=32, grad_block_k=32, fwd_block_v=32)
  _check((1, 45, 2, 64, 64), jnp.bfloat16, 16, config, interpret=True)


def test_interpret_fp32_k128_v128_tuned_k_tiles():
  config = gpu.tuned_config((1, 40, 1, 128), (1, 40, 1, 128), 16, jnp.float32)
  assert (config.score_block_k, config.grad_block_k, config.fused) == (32, 32, False)
  _check((1, 40, 1, 128, 128), jnp.float32, 16, None, interpret=True)


def test_interpret_fp32_two_pass_no_prefetch_one_grad_kernel_chunk32_k16_v32():
  config = gpu.KernelConfig(fused=False, prefetch=False, grad_version=1)
  _check((2, 37, 1, 16, 32), jnp.float32, 32, config, interpret=True)


def test_interpret_gate_cumsum_as_gemm_k16_v32():
  # Long sequences form G with the GEMM cumsum (tuned_config); the op must stay the same.
  assert gpu.tuned_config((1, 4096, 2, 16), (1, 4096, 2, 32)).gate_cumsum == "matmul"
  assert gpu.tuned_config((32, 256, 6, 32), (32, 256, 6, 64)).gate_cumsum == "scan"
  _check((1, 45, 2, 16, 32), jnp.float32, 16, gpu.KernelConfig(gate_cumsum="matmul"), interpret=True)


def test_interpret_one_reference_row_where_the_decay_span_allows(monkeypatch):
  """`intra="adaptive"` (the default) takes one reference row per chunk where every |G_r - G_m| <= SPAN_LIMIT
  and the levels elsewhere. Both gate regimes match the reference in fp32 and bf16: mild gates (|g| <= 1 per
  step: half-chunk spans <= 16 in 32-row chunks) and strong ones (|g| >= 2.5: spans >= 37; >= 90 at
  |g| >= 6, where the one-row path, forced, overflows fp32 and fails the check). Which path ran, told
  apart by the limit (read at trace time): with mild bf16 inputs the default gives what the forced one-row
  path gives, and differs from the forced levels (TF32 vs bf16 factor operands). T = 80 leaves a padded last
  chunk (16 real rows, constant G below). The other tests' gates (log-uniform 1e-3..10) mix both paths."""
  _, seed = fresh_rng()
  mild, strong, extreme = (1e-3, 1.0), (2.5, 6.0), (6.0, 10.0)

  def run(gates, dtype=jnp.bfloat16):
    return _check((1, 80, 2, 16, 32), dtype, 32, gpu.KernelConfig(fused=False), interpret=True,
                  seed_rng=(np.random.default_rng(seed), seed), gates=gates)
  for dtype in (jnp.float32, jnp.bfloat16):
    run(strong, dtype)
  run(extreme)
  default = run(mild)
  monkeypatch.setattr(gpu_kernels, "SPAN_LIMIT", -1.0)   # never the one-row path
  levels = run(mild)
  monkeypatch.setattr(gpu_kernels, "SPAN_LIMIT", float("inf"))  # always
  run(mild, jnp.float32)   # the forced one-row path is accurate in fp32 too
  one_row = run(mild)
  for name, a, b, c in zip(("o", "dq", "dk", "dv", "dg"), default, one_row, levels):
    a, b, c = (jnp.asarray(x, jnp.float32) for x in (a, b, c))
    assert rel_err(a, b) < 1e-6 < 1e-4 < rel_err(a, c), (name, rel_err(a, b), rel_err(a, c), seed)
  with pytest.raises(AssertionError):
    run(extreme)


# (state_segments asked, grad_version) per dtype: each dtype runs both gradient versions with segments, and
# between them the 6-segment (8 asked) and 4-segment splits run with the two-kernel gradient. Each interpreted
# kernel program takes a few seconds to compile on a 2-core CPU, so not every pair runs in both dtypes.
SEGMENT_RUNS = {jnp.float32: ((8, 2), (4, 1)), jnp.bfloat16: ((4, 2), (4, 1))}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_interpret_segmented_state_passes(dtype):
  """`state_segments`: the forward and reverse state passes run as parallel segments from zero states, and
  XLA forms what flows in from the earlier (later) segments, which the output and gradient kernels add as they
  load the states (the one-kernel gradient, grad_version=1, gets them summed up by XLA). 12 chunks of 16 in 4
  and in 6 segments (8 asked: the largest divisor <= 8), mild gates (|g| <= 0.05 per step) so that states
  carry across segment borders."""
  assert [gpu.state_segments(gpu.KernelConfig(state_segments=s), n)
          for s, n in ((8, 12), (4, 12), (8, 196), (16, 784), (4, 13), (1, 64))] == [6, 4, 7, 16, 1, 1]
  for segments, grad_version in SEGMENT_RUNS[dtype]:
    config = gpu.KernelConfig(fused=False, state_segments=segments, grad_version=grad_version)
    _check((1, 192, 2, 16, 32), dtype, 16, config, interpret=True, gates=(1e-3, 0.05))


def test_is_supported_and_input_errors():
  assert gpu.is_supported((2, 100, 6, 32), (2, 100, 6, 64), jnp.bfloat16)
  assert gpu.is_supported((2, 100, 6, 128), (2, 100, 6, 128), jnp.bfloat16)
  assert gpu.is_supported((2, 100, 6, 64), (2, 100, 6, 64), jnp.float32)
  assert gpu.is_supported((2, 100, 6, 128), (2, 100, 6, 128), jnp.float32)
  assert not gpu.is_supported((2, 100, 6, 24), (2, 100, 6, 64), jnp.bfloat16)   # not a power of two
  assert not gpu.is_supported((2, 100, 6, 8), (2, 100, 6, 64), jnp.bfloat16)    # below Triton's dot minimum
  assert not gpu.is_supported((2, 100, 6, 32), (2, 100, 6, 256), jnp.bfloat16)  # above the register budget
  assert not gpu.is_supported((2, 100, 6, 32), (2, 100, 6, 64), jnp.float16)
  x = jnp.zeros((1, 20, 1, 16))
  with pytest.raises(ValueError, match="chunk_size"):
    gpu.gla(x, x, x, x, chunk_size=24, interpret=True)
  with pytest.raises(ValueError, match="head dims"):
    y = jnp.zeros((1, 20, 1, 12))
    gpu.gla(y, y, x, y, interpret=True)
  with pytest.raises(ValueError, match="bf16/fp32"):
    gpu.gla(*(x.astype(jnp.float16) for x in (x, x, x)), x, interpret=True)
  with pytest.raises(ValueError, match="gate_cumsum"):
    gpu.gla(x, x, x, x, interpret=True, config=gpu.KernelConfig(gate_cumsum="tree"))
  with pytest.raises(ValueError, match="intra"):
    gpu.gla(x, x, x, x, interpret=True, config=gpu.KernelConfig(intra="dense"))
  with pytest.raises(ValueError, match="state_segments"):
    gpu.gla(x, x, x, x, interpret=True, config=gpu.KernelConfig(state_segments=0))


def test_default_chunk_and_tuned_tiles():
  assert [gpu.default_chunk_size(t) for t in (1, 16, 17, 40, 64, 65, 5000)] == [16, 16, 32, 64, 64, 64, 64]
  def state_tiles(b, t, dk, dv):
    cfg = gpu.tuned_config((b, t, 6, dk), (b, t, 6, dv))
    return cfg.state_block_k, cfg.state_block_v, cfg.state_segments
  # >= 128 chunks, K, V <= 64: whole states, segments up to ~192 programs (at most 16).
  assert state_tiles(2, 50176, 32, 64) == (32, 64, 16)
  assert not gpu.tuned_config((2, 50176, 6, 32), (2, 50176, 6, 64)).fused
  assert state_tiles(8, 12544, 32, 64) == (32, 64, 4) and state_tiles(8, 12544, 64, 64) == (64, 64, 4)
  assert state_tiles(2, 12544, 32, 64) == (32, 64, 16)  # DiG-S/2 at 1792 px (196 chunks: 14 segments run)
  # Fewer chunks or wider heads: (32, 32) tiles, (16, 32) with 8 segments below 64 programs from 64 chunks.
  assert state_tiles(2, 4096, 32, 64) == (16, 32, 8) and state_tiles(8, 4096, 32, 64) == (32, 32, 1)
  assert state_tiles(2, 12544, 128, 128) == (32, 32, 1)
  assert state_tiles(2, 2048, 32, 64) == (16, 32, 1)  # 32 chunks
  # <= 4 chunks: fused forward for few sequences, two-pass for many (DiG-S/2 at 256 px: B=32, H=6).
  assert gpu.tuned_config((8, 256, 6, 32), (8, 256, 6, 64)).fused
  assert not gpu.tuned_config((32, 256, 6, 32), (32, 256, 6, 64)).fused
  assert not gpu.tuned_config((8, 1024, 6, 32), (8, 1024, 6, 64)).fused
  # K tiles: the dq/dk/dG grid from K = 64 up; the score loops only for fp32 wider than 64.
  dig = gpu.tuned_config((8, 4096, 6, 32), (8, 4096, 6, 64))
  assert (dig.score_block_k, dig.grad_block_k) == (32, 32)
  wide = gpu.tuned_config((8, 4096, 6, 64), (8, 4096, 6, 64))
  assert (wide.score_block_k, wide.grad_block_k) == (64, 32)
  wide = gpu.tuned_config((8, 4096, 6, 128), (8, 4096, 6, 128))
  assert (wide.score_block_k, wide.grad_block_k, wide.fused) == (128, 32, False)
  wide = gpu.tuned_config((8, 4096, 6, 128), (8, 4096, 6, 128), dtype=jnp.float32)
  assert (wide.score_block_k, wide.grad_block_k) == (32, 32)
  assert not gpu.tuned_config((1, 256, 2, 128), (1, 256, 2, 128)).fused  # fused forward only up to 64


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_kernels_lower_to_triton_for_h100(monkeypatch):
  """Lowers forward and backward to Triton IR for an H100 (no GPU needed): catches unsupported Triton ops."""
  target_h100_for_triton_lowering(monkeypatch)
  configs = [gpu.KernelConfig(state_segments=4), gpu.KernelConfig(fused=True, prefetch=False),
             gpu.KernelConfig()]
  for (dk, dv), dtype, config in zip(((32, 64), (64, 64), (128, 128)),
                                     (jnp.bfloat16, jnp.float32, jnp.bfloat16), configs):
    args = [jax.ShapeDtypeStruct((2, 200, 3, d), dtype) for d in (dk, dk, dv)]
    args.append(jax.ShapeDtypeStruct((2, 200, 3, dk), jnp.float32))
    loss = lambda *a: gpu.gla(*a, config=config).astype(jnp.float32).sum()
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=("cuda",))
    # forward (1 or 2 kernels) + reverse state + dv + dq/dk/dG
    assert lowered.as_text().count("xla.gpu.triton") == (4 if config.fused else 5)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_fp32_dots_follow_the_callers_matmul_precision(monkeypatch):
  """fp32 inputs: IEEE dots by default, TF32 under a reduced-precision `jax.default_matmul_precision`."""
  assert gpu.fp32_dots_from_context() == "ieee"
  with jax.default_matmul_precision("tensorfloat32"):
    assert gpu.fp32_dots_from_context() == "tf32"
  with jax.default_matmul_precision("highest"):
    assert gpu.fp32_dots_from_context() == "ieee"
  x32, x16 = jnp.zeros((1, 8, 1, 16), jnp.float32), jnp.zeros((1, 8, 1, 16), jnp.bfloat16)
  highest, default = jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT
  assert gpu._common(x32, gpu.KernelConfig())["prec"] == highest
  assert gpu._common(x32, gpu.KernelConfig(fp32_dots="tf32"))["prec"] == default
  assert gpu._common(x16, gpu.KernelConfig(fp32_dots="ieee"))["prec"] == default
  with pytest.raises(ValueError, match="fp32_dots"):
    gpu.gla(x32, x32, x32, x32, interpret=True, config=gpu.KernelConfig(fp32_dots="tf16"))
  # The choice reaches the Triton kernels: the lowered fp32 program differs under the context (bf16: same).
  target_h100_for_triton_lowering(monkeypatch)

  def lowered(dtype, context):
    shape = (1, 64, 2, 16)
    args = [jax.ShapeDtypeStruct(shape, dtype)] * 3 + [jax.ShapeDtypeStruct(shape, jnp.float32)]
    with jax.default_matmul_precision(context):
      return jax.jit(lambda *a: gpu.gla(*a)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert lowered(jnp.float32, "highest") != lowered(jnp.float32, "tensorfloat32")
  assert lowered(jnp.bfloat16, "highest") == lowered(jnp.bfloat16, "tensorfloat32")


# ------------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [
    ((2, 1000, 3, 32, 64), jnp.bfloat16), ((2, 1000, 3, 32, 64), jnp.float32),
    ((1, 777, 2, 64, 64), jnp.bfloat16), ((1, 777, 2, 64, 64), jnp.float32),
    ((1, 520, 2, 128, 128), jnp.bfloat16), ((1, 520, 2, 128, 128), jnp.float32)])
def test_gpu_matches_reference(shape, dtype):
  _check(shape, dtype, None, None, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("gates", [(1e-3, 0.9), (0.5, 0.9)])
def test_gpu_one_reference_row_at_real_sizes(gates, dtype):
  # Gates up to 0.9 per step: every 64-row chunk's half-spans stay below SPAN_LIMIT (32 x 0.9 = 28.8), so the
  # one-row path runs everywhere; (0.5, 0.9) puts the factors near e^+-29.
  _check((2, 1000, 3, 32, 64), dtype, None, None, interpret=False, gates=gates)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,config", [
    ((2, 4096, 3, 32, 64), gpu.KernelConfig(state_segments=8)),  # 64 chunks in 8 segments, (32, 32) tiles
    ((1, 8192, 3, 32, 64), None),                                # tuned: whole 32 x 64 states, 16 segments
    ((1, 8150, 2, 64, 64), None)])                               # tuned: whole 64 x 64 states, 16 segments
def test_gpu_segmented_state_passes(shape, config):
  # Gates <= 0.1 per step carry state across segment borders.
  if config is None:
    tuned = gpu.tuned_config(shape[:4], shape[:3] + shape[4:])
    assert tuned.state_block_v == shape[4] and tuned.state_segments > 1
  _check(shape, jnp.bfloat16, None, config, interpret=False, gates=(1e-3, 0.1))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [dict(fused=True), dict(fused=True, prefetch=False), dict(prefetch=False),
                                     dict(state_block_k=16, state_block_v=16), dict(warps_grad=8, stages=3),
                                     dict(grad_version=1), dict(gate_cumsum="matmul"), dict(intra="levels")])
def test_gpu_kernel_variants_match_reference(variant):
  config = dataclasses.replace(gpu.KernelConfig(), **variant)
  _check((2, 3000, 6, 32, 64), jnp.bfloat16, None, config, interpret=False)
