"""Tests of the fused low-rank forget gate (`pallas_kernels.gla.gate`, `gpu_gate`, `gpu.gla_low_rank_gate`).

On CPU the gate kernels run through the Pallas interpreter: the gate's G and its VJP against the XLA formula
(`gate.low_rank_log_gate` + `reference.chunk_local_cumsum`), and the whole op with the fused gate against
`reference.chunked_gla` on the evaluated gate, forward and the gradients of q, k, v, x and the three gate
parameters; fresh random inputs every run (seed in the failure message), T not a multiple of the chunk, D
walked in several column tiles, logits up to +-40 (the log-sigmoid and its derivative without overflow).
Tolerances (relative Frobenius error): 2e-5 where every operand is fp32 (IEEE dots requested; measured
~5e-7 on CPU), 2e-2 with bf16 q/k/v/x and bf16 gate matmuls. A lowering test turns the kernels into
Triton IR for an H100. The `gpu` tests run them compiled: fp32 against the reference as above; with bf16
inputs against the fp32 reference, each error at most 1.25x the unfused path's (the same GLA kernels on
the XLA-formed gate) + 2e-3, and with fp32 gate matmuls within 5e-3 of the unfused path itself. Why not a
fixed tolerance: db is a sum over all tokens of a gradient that mostly cancels, so the GLA kernels' bf16 dG
error (~7e-3) comes out amplified, 2.1-2.5e-2 against the fp32 reference on the H100 for both paths; and with
bf16 gate matmuls the two paths round the logits, du and dz to bf16 at different points (XLA adds the bias
in bf16 and sums dz over heads in a bf16-output GEMM; the kernels keep both in fp32): 2.0e-2 apart on db,
8.1e-3 on dx (H100, session 10).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gla import gpu, gpu_gate, ops, reference
from pallas_kernels.gla.gate import LowRankGate, low_rank_log_gate
from tests.pallas_kernels.gla.gla_test_utils import fresh_rng, rel_err, target_h100_for_triton_lowering

SCALES = dict(q=1.0, k=1.0, v=1.0, x=1.0, w_down=0.3, w_up=1.0, b_up=3.0)


def _inputs(rng, b, t, h, dk, dv, dim, rank, dtype):
  shapes = dict(q=(b, t, h, dk), k=(b, t, h, dk), v=(b, t, h, dv), x=(b, t, dim), w_down=(dim, rank),
                w_up=(rank, h * dk), b_up=(h * dk,))
  arrays = {n: jnp.asarray(SCALES[n] * rng.standard_normal(s), jnp.float32) for n, s in shapes.items()}
  for n in ("q", "k", "v", "x"):
    arrays[n] = arrays[n].astype(dtype)
  return arrays


def _gate(a, matmul_dtype):
  return LowRankGate(a["x"], a["w_down"], a["w_up"], a["b_up"], matmul_dtype=matmul_dtype)


def _fused(a, matmul_dtype, chunk, interpret=True):
  gate = _gate(a, matmul_dtype)
  return gpu.gla_low_rank_gate(a["q"], a["k"], a["v"], gate, chunk_size=chunk, interpret=interpret)


def _unfused(a, matmul_dtype, chunk):
  up = {n: x.astype(jnp.float32) for n, x in a.items()}
  log_gate = low_rank_log_gate(_gate(up, matmul_dtype), a["q"].shape[2])
  return reference.chunked_gla(up["q"], up["k"], up["v"], log_gate, chunk_size=chunk or 64,
                               precision=jax.lax.Precision.HIGHEST)


def _value_and_grads(fn, a, do):
  out, vjp = jax.vjp(fn, a)
  return out, vjp(do)[0]


def _compare(shape, dtype, matmul_dtype, chunk, tol, interpret=True):
  rng, seed = fresh_rng()
  b, t, h, dk, dv, dim, rank = shape
  a = _inputs(rng, b, t, h, dk, dv, dim, rank, dtype)
  do = jnp.asarray(rng.standard_normal((b, t, h, dv)), dtype)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda a, do: _value_and_grads(lambda a: _fused(a, matmul_dtype, chunk, interpret), a, do))(
        a, do)
    want = jax.jit(lambda a, do: _value_and_grads(lambda a: _unfused(a, matmul_dtype, chunk), a, do))(
        a, do.astype(jnp.float32))
  assert got[0].dtype == dtype and got[0].shape == (b, t, h, dv)
  assert rel_err(jnp.asarray(got[0], jnp.float32), want[0]) < tol, ("o", seed, shape, dtype)
  for name in a:
    assert got[1][name].shape == a[name].shape and got[1][name].dtype == a[name].dtype, name
    err = rel_err(jnp.asarray(got[1][name], jnp.float32), want[1][name])
    assert err < tol, (name, err, seed, shape, dtype, matmul_dtype)


def test_interpret_fused_gate_fp32_matches_reference_with_padding_and_d_tiles():
  # T = 50 with chunk 16: 4 chunks, the last padded; D = 96 = three column tiles of 32.
  _compare((2, 50, 3, 16, 32, 96, 16), jnp.float32, "float32", 16, 2e-5)


def test_interpret_fused_gate_bf16_inputs_and_bf16_gate_matmuls():
  _compare((1, 40, 2, 32, 64, 48, 16), jnp.bfloat16, "float32", 16, 2e-2)
  _compare((1, 40, 2, 32, 64, 48, 16), jnp.bfloat16, "bfloat16", 16, 2e-2)


def test_interpret_gate_kernel_alone_with_large_logits():
  """G and its VJP for logits up to +-40: log-sigmoid saturates (0 or -u) without overflow or NaN."""
  rng, seed = fresh_rng()
  b, t, h, dk, dim, rank, chunk = 2, 64, 2, 16, 32, 16, 32
  x = jnp.asarray(rng.standard_normal((b, t, dim)), jnp.float32)
  w_down = jnp.asarray(rng.standard_normal((dim, rank)) / np.sqrt(dim), jnp.float32)
  w_up = jnp.asarray(10 * rng.standard_normal((rank, h * dk)) / np.sqrt(rank), jnp.float32)
  b_up = jnp.asarray(rng.uniform(-30, 30, (h * dk,)), jnp.float32)
  spec = gpu_gate.GateSpec(chunk=chunk, heads=h, dim_k=dk, ieee=True, interpret=True)
  d_cum = jnp.asarray(rng.standard_normal((b, t, h * dk)), jnp.float32)

  def xla(x, w_down, w_up, b_up):
    with jax.default_matmul_precision("highest"):
      log_gate = low_rank_log_gate(LowRankGate(x, w_down, w_up, b_up), h)
    return reference.chunk_local_cumsum(log_gate, chunk).reshape(b, t, h * dk)

  args = (x, w_down, w_up, b_up)
  got, got_vjp = jax.vjp(lambda *a: gpu_gate.cumulative_low_rank_gate(*a, spec), *args)
  want, want_vjp = jax.vjp(xla, *args)
  with jax.default_matmul_precision("highest"):
    logits = x @ w_down @ w_up + b_up
  assert float(jnp.abs(logits).max()) > 30 and float(logits.max()) > 15 and float(logits.min()) < -15
  assert rel_err(got, want) < 2e-6, (seed, rel_err(got, want))
  for name, a, r in zip(("dx", "dw_down", "dw_up", "db_up"), got_vjp(d_cum), want_vjp(d_cum)):
    assert rel_err(a, r) < 2e-5, (name, rel_err(a, r), seed)


def test_support_and_clear_errors():
  a = _inputs(np.random.default_rng(0), 1, 20, 2, 16, 16, 48, 16, jnp.float32)
  q_shape = a["q"].shape
  assert gpu_gate.is_supported(_gate(a, "float32"), q_shape, 16)
  odd = LowRankGate(a["x"][..., :40], a["w_down"][:40], a["w_up"], a["b_up"])  # D = 40: 8-column tiles
  assert not gpu_gate.is_supported(odd, q_shape, 16) and not gpu.low_rank_gate_supported(odd, q_shape, 16)
  wrong = LowRankGate(a["x"], a["w_down"], a["w_up"][:, :16], a["b_up"])
  with pytest.raises(ValueError, match="do not fit"):
    ops.gla(a["q"], a["k"], a["v"], wrong, impl="chunked")
  with pytest.raises(ValueError, match="matmul_dtype"):
    ops.gla(a["q"], a["k"], a["v"], LowRankGate(a["x"], a["w_down"], a["w_up"], a["b_up"],
                                                matmul_dtype="int8"), impl="chunked")
  with pytest.raises(ValueError, match="powers of two"):
    gpu.gla_low_rank_gate(a["q"], a["k"], a["v"], odd, interpret=True)


def test_dispatcher_falls_back_to_the_formula_where_no_kernel_forms_the_gate():
  """ops.gla with a LowRankGate equals ops.gla with the evaluated log gate: chunked, and an odd D on the GPU
  kernel (the gate then runs in XLA, the op still in the kernel)."""
  a = _inputs(np.random.default_rng(1), 2, 20, 2, 16, 16, 40, 16, jnp.float32)
  gate = _gate(a, "float32")
  log_gate = low_rank_log_gate(gate, 2)
  for impl in ("chunked", "pallas_gpu"):
    got = ops.gla(a["q"], a["k"], a["v"], gate, impl=impl, chunk_size=16, interpret=True)
    want = ops.gla(a["q"], a["k"], a["v"], log_gate, impl=impl, chunk_size=16, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_fused_gate_lowers_to_triton_for_h100(monkeypatch):
  target_h100_for_triton_lowering(monkeypatch)
  b, t, h, dim, rank = 32, 256, 6, 384, 16
  args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16) for d in (32, 32, 64)] + [
      jax.ShapeDtypeStruct((b, t, dim), jnp.bfloat16), jax.ShapeDtypeStruct((dim, rank), jnp.float32),
      jax.ShapeDtypeStruct((rank, h * 32), jnp.float32), jax.ShapeDtypeStruct((h * 32,), jnp.float32)]

  def loss(q, k, v, *gate):
    return gpu.gla_low_rank_gate(q, k, v, LowRankGate(*gate)).astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=tuple(range(7)))).trace(*args).lower(lowering_platforms=("cuda",))
  # gate forward + state + output; reverse state + dv + dq/dk/dG + the gate's head and input backward
  text = lowered.as_text()
  assert text.count("xla.gpu.triton") == 8
  assert "stablehlo.reduce_window" not in text  # the XLA cumsum (and its transpose) are gone


@pytest.mark.gpu
def test_gpu_fused_gate_fp32_matches_reference():
  _compare((1, 777, 4, 64, 64, 256, 16), jnp.float32, "float32", None, 2e-5, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,matmul_dtype", [((8, 256, 6, 32, 64, 384, 16), "float32"),
                                                ((2, 1000, 6, 32, 64, 384, 16), "bfloat16")])
def test_gpu_fused_gate_bf16_is_as_accurate_as_the_unfused_path(shape, matmul_dtype):
  """bf16 inputs: the fused path's output and seven gradients are as close to the fp32 reference as the
  unfused path's (same GLA kernels, gate formed by XLA); with fp32 gate matmuls also close to it directly."""
  rng, seed = fresh_rng()
  b, t, h, dk, dv, dim, rank = shape
  a = _inputs(rng, b, t, h, dk, dv, dim, rank, jnp.bfloat16)
  do = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.bfloat16)

  def unfused(a):
    return gpu.gla(a["q"], a["k"], a["v"], low_rank_log_gate(_gate(a, matmul_dtype), h))

  got, base = (jax.jit(lambda a, do, f=f: _value_and_grads(f, a, do))(a, do)
               for f in (lambda a: _fused(a, matmul_dtype, None, interpret=False), unfused))
  with jax.default_matmul_precision("highest"):
    want = jax.jit(lambda a, do: _value_and_grads(lambda a: _unfused(a, "float32", None), a, do))(
        a, do.astype(jnp.float32))
  as_f32 = lambda x: jnp.asarray(x, jnp.float32)
  rows = [("o", got[0], base[0], want[0])] + [(n, got[1][n], base[1][n], want[1][n]) for n in a]
  for name, x, y, r in rows:
    assert x.dtype == y.dtype
    err, base_err = rel_err(as_f32(x), r), rel_err(as_f32(y), r)
    assert err <= 1.25 * base_err + 2e-3, (name, err, base_err, seed, shape, matmul_dtype)
    if matmul_dtype == "float32":  # the same arithmetic up to summation order and the cumsum's kernel
      assert rel_err(as_f32(x), as_f32(y)) < 5e-3, (name, seed, shape)
