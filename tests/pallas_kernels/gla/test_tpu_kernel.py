"""Tests for the TPU GLA kernel (`pallas_kernels/gla/tpu.py`), run without a TPU.

Numerics. The real kernel bodies run in interpret mode on the CPU. They are compared with
`reference.chunked_gla` (fp32, precision HIGHEST, on the same inputs upcast to fp32) for the output and the
gradients of q, k, v and the log gate.
- Inputs are fresh random draws every run; failure messages print the seed.
- T is never a multiple of the chunk, and there are >= 3 chunks where the carried state matters.
- Per-step log gates span -1e-3 .. -10 (log-uniform), with one channel pinned at each end, so both long
  cross-chunk memory and instant forgetting are exercised.

Tolerances, as max|kernel - ref| <= tol * max|ref| per tensor:
- fp32 inputs: 2e-5. Interpret mode computes exactly in fp32 (observed ~3e-7); a wrong term would be O(1).
- bf16 inputs: 2e-2. The output is bf16 and the MXU operands are bf16 (observed ~4e-3).

TPU rules that interpret mode does not check:
- every BlockSpec's last two dims are divisible by (8, 128) or equal the array's;
- forward + backward lower to Mosaic TPU MLIR. `jax.export` for platform "tpu" with an abstract TPU device
  runs the Pallas -> Mosaic lowering on the CPU; Mosaic's own compilation still needs a real TPU.

One run uses the TPU interpret simulator with 2 cores, NaN-filled scratch and the race detector.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gla import reference, tpu

FP32_TOL = 2e-5
BF16_TOL = 2e-2


def _fresh_seed() -> int:
  return int.from_bytes(os.urandom(4), "little")


def _inputs(seed: int, b: int, t: int, h: int, dk: int, dv: int, dtype):
  rng = np.random.default_rng(seed)
  q, k = (rng.standard_normal((b, t, h, dk)) for _ in range(2))
  v = rng.standard_normal((b, t, h, dv))
  log_gate = -np.exp(rng.uniform(np.log(1e-3), np.log(10.0), (b, t, h, dk)))
  log_gate[..., 0] = -1e-3
  log_gate[..., 1] = -10.0
  cotangent = rng.standard_normal((b, t, h, dv))
  cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
  return cast(q), cast(k), cast(v), jnp.asarray(log_gate, jnp.float32), cast(cotangent)


def _value_and_grads(fn, q, k, v, log_gate, cotangent):
  out, vjp = jax.vjp(fn, q, k, v, log_gate)
  return (out, *vjp(cotangent.astype(out.dtype)))


def _check_against_reference(seed, b, t, h, dk, dv, dtype, tol, **kernel_kwargs):
  q, k, v, log_gate, cot = _inputs(seed, b, t, h, dk, dv, dtype)
  chunk = kernel_kwargs.get("chunk_size") or tpu.DEFAULT_CHUNK_SIZE
  scale = kernel_kwargs.get("scale")
  got = jax.jit(lambda *a: _value_and_grads(lambda *x: tpu.gla(*x, **kernel_kwargs), *a))(
      q, k, v, log_gate, cot)
  f32 = [x.astype(jnp.float32) for x in (q, k, v, log_gate, cot)]

  def ref_fn(*x):
    return reference.chunked_gla(*x, chunk_size=chunk, scale=scale, precision="highest")

  want = jax.jit(lambda *a: _value_and_grads(ref_fn, *a))(*f32)
  assert got[0].dtype == v.dtype and got[0].shape == v.shape
  for name, g_, w_, like in zip(("o", "dq", "dk", "dv", "dlog_gate"), got, want, (v, q, k, v, log_gate)):
    assert g_.dtype == like.dtype and g_.shape == like.shape, name
    g_, w_ = np.asarray(g_, np.float64), np.asarray(w_, np.float64)
    assert np.all(np.isfinite(g_)), f"{name}: non-finite values (seed {seed})"
    err, ref_max = np.max(np.abs(g_ - w_)), np.max(np.abs(w_))
    assert err <= tol * ref_max, f"{name}: max err {err:.3g} > {tol} * {ref_max:.3g} (seed {seed})"


@pytest.mark.parametrize("b,t,h,dk,dv,dtype,kwargs", [
    # DiG head dims, 4 heads packed per 128 lanes; 9 heads -> padded to 12 -> 3 head groups. >= 3 chunks, so
    # the carried state and its gradient are decayed at least once after being non-zero.
    (2, 150, 9, 32, 64, jnp.float32, dict(chunk_size=64)),
    # DiG-S (6 heads, padded to 8 -> 2 head groups), bf16, explicit scale.
    (1, 150, 6, 32, 64, jnp.bfloat16, dict(chunk_size=64, scale=0.3)),
    # 64/64 packs 2 heads; all defaults (chunk 128, interpret chosen automatically off-TPU).
    (1, 300, 2, 64, 64, jnp.float32, dict()),
])
def test_matches_reference(b, t, h, dk, dv, dtype, kwargs):
  if "chunk_size" in kwargs:
    kwargs = dict(kwargs, interpret=True)
  tol = BF16_TOL if dtype == jnp.bfloat16 else FP32_TOL
  _check_against_reference(_fresh_seed(), b, t, h, dk, dv, dtype, tol, **kwargs)


def test_head_dim_128_chunk_128():
  _check_against_reference(_fresh_seed(), 1, 40, 1, 128, 128, jnp.float32, FP32_TOL, chunk_size=128,
                           interpret=True)


@pytest.mark.slow  # The TPU simulator is the slowest interpreter (~10 s).
def test_tpu_interpreter_megacore_no_races(capsys):
  """TPU simulator: 2 cores split the parallel axes, scratch starts as NaN, race detector on (all 3 kernels)."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # Private: where race results live.
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, uninitialized_memory="nan")
  _check_against_reference(_fresh_seed(), 2, 70, 4, 32, 64, jnp.float32, FP32_TOL, chunk_size=64,
                           interpret=params)
  # The detector prints "RACE DETECTED" for any kernel; the flag survives only for the last one.
  assert "RACE DETECTED" not in capsys.readouterr().out
  assert interpret_pallas_call.races is not None and not interpret_pallas_call.races.races_found


DIG_SHAPES = [((2, 256, h, 32), (2, 256, h, 64)) for h in (6, 12, 16, 18)]
OTHER_SHAPES = [((2, 100, 4, 64), (2, 100, 4, 64)), ((1, 40, 2, 128), (1, 40, 2, 128)),
                ((1, 300, 9, 32), (1, 300, 9, 64)), ((1, 77, 3, 64), (1, 77, 3, 128))]


@pytest.mark.parametrize("q_shape,v_shape", DIG_SHAPES + OTHER_SHAPES)
@pytest.mark.parametrize("chunk", [64, 128])
def test_block_shapes_follow_tpu_tiling(q_shape, v_shape, chunk):
  specs = tpu.block_shapes(q_shape, v_shape, jnp.bfloat16, chunk)
  assert {name for name, _, _ in specs} >= {"fwd.q", "fwd.o", "fwd.states", "bwd.do", "bwd.dG", "bwd.states"}
  for name, block, array in specs:
    assert len(block) == len(array), name
    assert None not in block[-2:], name
    assert block[-2] % 8 == 0 or block[-2] == array[-2], (name, block, array)
    assert block[-1] % 128 == 0 or block[-1] == array[-1], (name, block, array)
  assert all(block[-1] % 128 == 0 for _, block, _ in specs)  # Lane-dense: heads are packed/padded to 128s.


def _lower_for_tpu(fn, *args, device_kind: str = "TPU v5 lite"):
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


@pytest.mark.parametrize("h,dk,dv,chunk,dtype,device_kind", [
    (12, 32, 64, 128, jnp.bfloat16, "TPU v5 lite"), (6, 32, 64, 64, jnp.float32, "TPU v5 lite"),
    (18, 32, 64, 128, jnp.bfloat16, "TPU v6 lite"), (2, 64, 64, 128, jnp.bfloat16, "TPU v5"),
    (1, 128, 128, 128, jnp.float32, "TPU v6 lite")])
def test_forward_and_backward_lower_to_mosaic_tpu(h, dk, dv, chunk, dtype, device_kind):
  q = jax.ShapeDtypeStruct((2, 200, h, dk), dtype)
  v = jax.ShapeDtypeStruct((2, 200, h, dv), dtype)
  g = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  fwd = lambda *a: tpu.gla(*a, chunk_size=chunk, interpret=False)  # noqa: E731
  loss = lambda *a: jnp.sum(fwd(*a).astype(jnp.float32) ** 2)  # noqa: E731
  module = _lower_for_tpu(lambda *a: jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*a), q, q, v, g,
                          device_kind=device_kind)
  assert module.count("tpu_custom_call") == 3  # forward, state recompute, reverse backward.


def test_lowering_check_catches_illegal_blocks():
  """The export-based check above really runs the Mosaic lowering: a 64-lane block is rejected."""
  from jax.experimental import pallas as pl

  def copy(x):
    return pl.pallas_call(lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...]),
                          out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2,),
                          in_specs=[pl.BlockSpec((8, 64), lambda i: (0, i))],
                          out_specs=pl.BlockSpec((8, 64), lambda i: (0, i)))(x)

  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    _lower_for_tpu(copy, jax.ShapeDtypeStruct((8, 128), jnp.float32))


def test_is_supported():
  for q_shape, v_shape in DIG_SHAPES + OTHER_SHAPES:
    assert tpu.is_supported(q_shape, v_shape, jnp.bfloat16)
    assert tpu.is_supported(q_shape, v_shape, jnp.float32)
  assert not tpu.is_supported((2, 256, 6, 32), (2, 256, 6, 64), jnp.float16)
  assert not tpu.is_supported((2, 256, 6, 32), (2, 256, 7, 64), jnp.float32)
  assert not tpu.is_supported((2, 256, 32), (2, 256, 64), jnp.float32)
  assert not tpu.is_supported((1, 64, 16, 48), (1, 64, 16, 48), jnp.float32)  # 48 needs 8 heads = 384 lanes.
  assert tpu.is_supported((1, 64, 3, 16), (1, 64, 3, 32), jnp.float32)  # 8 heads of 16/32 = 128/256 lanes.


def test_dispatcher_picks_this_kernel_on_tpu():
  from pallas_kernels.gla import ops
  for q_shape, v_shape in DIG_SHAPES:
    impl = ops.resolve_impl("auto", q_shape, v_shape, jnp.bfloat16, platform="tpu")
    assert impl == ops.GlaImpl.PALLAS_TPU


def test_bad_input_raises_clear_errors():
  q = jnp.zeros((1, 16, 4, 32))
  v = jnp.zeros((1, 16, 4, 64))
  with pytest.raises(ValueError, match="one shape"):
    tpu.gla(q, q[..., :16], v, q)
  with pytest.raises(ValueError, match="chunk_size"):
    tpu.gla(q, q, v, q, chunk_size=32, interpret=True)
  with pytest.raises(ValueError, match="float32 and bfloat16"):
    tpu.gla(q.astype(jnp.float16), q.astype(jnp.float16), v.astype(jnp.float16), q, interpret=True)
