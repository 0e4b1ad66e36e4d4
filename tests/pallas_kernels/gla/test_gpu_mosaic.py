"""Tests of the Mosaic GPU forward (`pallas_kernels.gla.gpu_mosaic`) and its dispatch in `gpu`.

Mosaic GPU's interpreter has no wgmma rule in JAX 0.11, so on CPU the kernels are lowered, not run: the state
and output passes (both state layouts, segments, K 32 and 64) go through the Mosaic GPU lowering for an H100
(`jax.export` for CUDA runs the real layout inference and lowering rules without a GPU). Also on CPU: the
segment join against `gpu._join_segments` (transposed), the support rule, `tuned_config`'s choice, and that
interpreted or differentiated calls never take the Mosaic path.

The `gpu` tests run the compiled kernels (DIG_TEST_GPU=1): the op's forward without a gradient (which takes
the Mosaic kernels from 4096 tokens, asserted) against `reference.chunked_gla` on the same bf16-rounded inputs
(fp32, HIGHEST), fresh random inputs every run (seed in the message), T not a multiple of the chunk, DiG's
gates (one-reference-row scores everywhere) and gates -|g| with |g| log-uniform in [1e-3, 10] per step (many
chunks beyond the span limit, so the in-kernel level scheme runs too; and -10 per step everywhere).
Tolerance: 1.5e-2 relative Frobenius error, as the Triton kernels' bf16 tests (measured 2.6e-3 with DiG's
gates on the H100, session 11); against the Triton forward on the same inputs 1e-2.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gla import gpu, gpu_mosaic, reference
from tests.pallas_kernels.gla.gla_test_utils import fresh_rng, random_inputs, rel_err

TOL = 1.5e-2


def _shapes(b, t, h, dk, dv):
  s = jax.ShapeDtypeStruct
  return (s((b, t, h, dk), jnp.bfloat16), s((b, t, h, dk), jnp.bfloat16), s((b, t, h, dv), jnp.bfloat16),
          s((b, t, h, dk), jnp.float32))


def _ops_on_arrays_of_size(jaxpr, size: int) -> set[str]:
  """Names of the primitives (nested jaxprs included) with an output of at least `size` elements."""
  names = set()
  for eqn in jaxpr.eqns:
    if any(int(np.prod(getattr(o.aval, "shape", ()))) >= size for o in eqn.outvars):
      names.add(eqn.primitive.name)
    if eqn.primitive.name == "mpmd_map":
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          names |= _ops_on_arrays_of_size(inner, size)
  return names


# What may touch gate-sized arrays outside the kernels when they form G themselves: the kernels, their
# wrappers and a view (reshape).
KERNELS_AND_VIEWS = {"mpmd_map", "custom_vmap_call", "pjit", "reshape"}


def _lower_for_cuda(fn, *args) -> str:
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()


@pytest.mark.parametrize("dim_k", [32, 64])
@pytest.mark.parametrize("raw_gate", [False, True])
def test_forward_lowers_for_h100(dim_k, raw_gate):
  q, k, v, g = _shapes(2, 640, 3, dim_k, 64)
  text = _lower_for_cuda(lambda q, k, v, g: gpu_mosaic.forward(q, k, v, g, scale=0.2, segments=5,
                                                               raw_gate=raw_gate), q, k, v, g)
  assert text.count("mosaic_gpu") >= 2, "expected the state and output kernels as Mosaic GPU custom calls"
  if raw_gate:   # the cumsum is in the kernels: no XLA op outside them works on gate-sized arrays
    jaxpr = jax.make_jaxpr(lambda q, k, v, g: gpu_mosaic.forward(q, k, v, g, scale=0.2, segments=5,
                                                                 raw_gate=True))(q, k, v, g)
    assert _ops_on_arrays_of_size(jaxpr.jaxpr, int(np.prod(g.shape))) <= KERNELS_AND_VIEWS
  hs = jax.ShapeDtypeStruct((2, 10, 3, dim_k, 64), jnp.bfloat16)
  assert "mosaic_gpu" in _lower_for_cuda(
      lambda q, k, v, g, hs: gpu_mosaic.out_pass(q, k, v, g, hs, scale=0.2), q, k, v, g, hs)


def test_join_matches_the_triton_join_transposed():
  rng, seed = fresh_rng()
  b, nt, h, dk, dv, segments = 2, 12, 3, 8, 16, 4
  local = jnp.asarray(rng.standard_normal((b, nt, h, dk, dv)), jnp.float32)
  ends = jnp.asarray(rng.standard_normal((b, segments, h, dk, dv)), jnp.float32)
  gamma = jnp.asarray(-rng.uniform(0, 2, (b, nt, h, dk)), jnp.float32)
  ours = gpu_mosaic._join(local.swapaxes(-1, -2), ends.swapaxes(-1, -2), gamma)
  theirs = gpu._join_segments(local, ends, gamma, reverse=False)
  np.testing.assert_allclose(ours.carry.swapaxes(-1, -2), theirs.carry, rtol=1e-5, atol=1e-6,
                             err_msg=f"seed {seed}")
  np.testing.assert_allclose(ours.decay, theirs.decay, rtol=1e-6, err_msg=f"seed {seed}")


def test_support_rule_and_errors():
  assert gpu_mosaic.supported((2, 128, 3, 32), (2, 128, 3, 64), jnp.bfloat16, 64)
  assert gpu_mosaic.supported((2, 128, 3, 64), (2, 128, 3, 64), jnp.bfloat16, 64)
  for q_shape, v_shape, dtype, chunk in [((2, 128, 3, 32), (2, 128, 3, 64), jnp.float32, 64),
                                         ((2, 128, 3, 128), (2, 128, 3, 64), jnp.bfloat16, 64),
                                         ((2, 128, 3, 32), (2, 128, 3, 32), jnp.bfloat16, 64),
                                         ((2, 128, 3, 32), (2, 128, 3, 64), jnp.bfloat16, 32),
                                         ((2, 100, 3, 32), (2, 100, 3, 64), jnp.bfloat16, 64)]:
    assert not gpu_mosaic.supported(q_shape, v_shape, dtype, chunk)
  q = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
  v = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="K in"):
    gpu_mosaic.forward(q, q, v, jnp.zeros(q.shape, jnp.float32), scale=1.0)
  q, v = jnp.zeros((1, 64, 1, 32), jnp.bfloat16), jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
  for v_bad, g_bad in [(v.astype(jnp.float32), jnp.zeros(q.shape, jnp.float32)), (v, q),   # fp32 v, bf16 g
                       (v[:, :, :, :32], jnp.zeros(q.shape, jnp.float32))]:               # V = 32
    with pytest.raises(ValueError, match="fp32 gate"):
      gpu_mosaic.forward(q, q, v_bad, g_bad, scale=1.0)
  with pytest.raises(ValueError, match="fp32 gate"):                  # k's shape is not q's
    gpu_mosaic.out_pass(q, q[:, :, :, :16], v, jnp.zeros(q.shape, jnp.float32),
                        jnp.zeros((1, 1, 1, 32, 64), jnp.bfloat16), scale=1.0)
  q = jnp.zeros((1, 192, 1, 32), jnp.bfloat16)
  with pytest.raises(ValueError, match="must divide"):
    gpu_mosaic.state_pass(q, jnp.zeros((1, 192, 1, 64), jnp.bfloat16), jnp.zeros(q.shape, jnp.float32), 2)


def test_tuned_config_picks_mosaic_for_long_bf16_sequences():
  pick = lambda q, v, dtype=jnp.bfloat16: gpu.tuned_config(q, v, 64, dtype).forward_backend
  assert pick((8, 12544, 6, 32), (8, 12544, 6, 64)) == "mosaic"
  assert pick((2, 4096, 6, 64), (2, 4096, 6, 64)) == "mosaic"
  assert pick((2, 4133, 6, 32), (2, 4133, 6, 64)) == "mosaic"             # padded to whole chunks
  assert pick((32, 256, 6, 32), (32, 256, 6, 64)) == "triton"             # measured slower there
  assert pick((8, 12544, 6, 32), (8, 12544, 6, 64), jnp.float32) == "triton"
  assert pick((8, 12544, 6, 128), (8, 12544, 6, 128)) == "triton"
  with pytest.raises(ValueError, match="forward_backend"):
    gpu._check_config(dataclasses.replace(gpu.tuned_config((1, 64, 1, 32), (1, 64, 1, 64)),
                                          forward_backend="cuda"))
  assert gpu.mosaic_segments(48, 196) == 4 and gpu.mosaic_segments(12, 196) == 14
  assert gpu.mosaic_segments(192, 4) == 1


def test_interpreted_or_differentiated_calls_keep_the_triton_kernels():
  cfg = dataclasses.replace(gpu.tuned_config((1, 4096, 1, 32), (1, 4096, 1, 64)), chunk_size=64)
  q, v = jnp.zeros((1, 4096, 1, 32), jnp.bfloat16), jnp.zeros((1, 4096, 1, 64), jnp.bfloat16)
  assert cfg.forward_backend == "mosaic" and gpu.uses_mosaic_forward(q, v, cfg)
  assert not gpu.uses_mosaic_forward(q, v, dataclasses.replace(cfg, interpret=True))
  assert not gpu.uses_mosaic_forward(q.astype(jnp.float32), v.astype(jnp.float32), cfg)
  # The VJP's forward saves states for the Triton backward: its jaxpr has no Mosaic kernel.
  g = jnp.zeros(q.shape, jnp.float32)
  for op in (gpu.gla_chunked_g, gpu.gla_chunked_log_gate):
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda q: op(q, q, v, g, cfg).astype(jnp.float32).sum()))(q))
    fwd_jaxpr = str(jax.make_jaxpr(lambda q: op(q, q, v, g, cfg))(q))
    assert "mpmd_map" in fwd_jaxpr and "mpmd_map" not in grad_jaxpr
  # From the raw log gate the state pass forms G: no XLA op on gate-sized arrays (the cumsum is a GEMM from
  # 4096 tokens, so "cumsum" alone would not show it), with 16 segments here and with one (B H >= 192).
  big = [jax.ShapeDtypeStruct((32, 4096, 6, d), dt) for d, dt in ((32, jnp.bfloat16), (64, jnp.bfloat16),
                                                                   (32, jnp.float32))]
  assert gpu.mosaic_segments(1, 64) == 16 and gpu.mosaic_segments(32 * 6, 64) == 1
  for q_, v_, g_ in ((q, v, g), big):
    jaxpr = jax.make_jaxpr(lambda q, v, g: gpu.gla_chunked_log_gate(q, q, v, g, cfg))(q_, v_, g_)
    ops = _ops_on_arrays_of_size(jaxpr.jaxpr, int(np.prod(g_.shape)))
    assert ops <= KERNELS_AND_VIEWS | {"custom_vjp_call"}


@pytest.mark.parametrize("method", ["scan", "matmul"])
def test_log_gate_vjp_matches_autodiff_through_the_cumsum(method):
  """`gla_chunked_log_gate`'s VJP (the cumsum's transpose applied by hand) against autodiff of the cumsum
  followed by `gla_chunked_g`: the formulation it replaced (interpreted Triton kernels, fp32)."""
  rng, seed = fresh_rng()
  b, t, h, dk, dv = 1, 128, 2, 16, 16
  q, k, v, g = (jnp.asarray(x) for x in random_inputs(rng, b, t, h, dk, dv))
  cfg = dataclasses.replace(gpu.tuned_config(q.shape, v.shape, 64, q.dtype), chunk_size=64, scale=0.25,
                            interpret=True, gate_cumsum=method)
  do = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
  new = jax.vjp(lambda *a: gpu.gla_chunked_log_gate(*a, cfg), q, k, v, g)
  old = jax.vjp(lambda q, k, v, g: gpu.gla_chunked_g(q, k, v, gpu._gate_cumsum(g, cfg), cfg), q, k, v, g)
  np.testing.assert_allclose(new[0], old[0], rtol=1e-6, atol=1e-6, err_msg=f"seed {seed}")
  for a, b_ in zip(new[1](do), old[1](do)):
    np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")


def _op_forward(q, k, v, log_gate, backend: str | None = None):
  config = None
  if backend is not None:
    config = dataclasses.replace(gpu.tuned_config(q.shape, v.shape, 64, q.dtype), forward_backend=backend)
  return jax.jit(lambda q, k, v, lg: gpu.gla(q, k, v, lg, chunk_size=64, config=config))(q, k, v, log_gate)


@pytest.mark.gpu
@pytest.mark.parametrize("dim_k", [32, 64])
@pytest.mark.parametrize("gates", ["dig", "log_uniform", "strong"])
@pytest.mark.parametrize("b,t,h", [(2, 4133, 3), (1, 12544, 2)])
def test_gpu_forward_matches_reference(b, t, h, dim_k, gates):
  rng, seed = fresh_rng()
  q, k, v, g = random_inputs(rng, b, t, h, dim_k, 64)
  if gates == "dig":
    g = np.asarray(jax.nn.log_sigmoid(2 * rng.standard_normal(g.shape)) / 16, np.float32)
  elif gates == "strong":
    g = -rng.uniform(5.0, 10.0, g.shape).astype(np.float32)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  cfg = dataclasses.replace(gpu.tuned_config(q.shape, v.shape, 64, q.dtype), chunk_size=64)
  assert gpu.uses_mosaic_forward(reference.pad_to_chunks(q, 64), v, cfg)
  o = _op_forward(q, k, v, jnp.asarray(g))
  ref = reference.chunked_gla(*(x.astype(jnp.float32) for x in (q, k, v)), jnp.asarray(g), chunk_size=64,
                              precision=jax.lax.Precision.HIGHEST)
  err = rel_err(o.astype(jnp.float32), ref)
  assert err < TOL, f"mosaic forward vs reference: {err:.2e} (seed {seed})"
  triton = _op_forward(q, k, v, jnp.asarray(g), backend="triton")
  err_triton = rel_err(o.astype(jnp.float32), triton.astype(jnp.float32))
  assert err_triton < 1e-2, f"mosaic vs triton forward: {err_triton:.2e} (seed {seed})"


@pytest.mark.gpu
@pytest.mark.parametrize("raw_gate", [False, True])
@pytest.mark.parametrize("segments", [1, 5, 13])
def test_gpu_state_pass_segments(segments, raw_gate):
  rng, seed = fresh_rng()
  b, t, h, dk, dv = 2, 4160, 3, 32, 64                 # 65 chunks: segments of 65, 13 and 5 chunks
  q, k, v, g = random_inputs(rng, b, t, h, dk, dv)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  gate = jnp.asarray(g) if raw_gate else reference.chunk_local_cumsum(jnp.asarray(g), 64)
  o = jax.jit(lambda *a: gpu_mosaic.forward(*a, scale=dk ** -0.5, segments=segments, raw_gate=raw_gate))(
      q, k, v, gate)
  ref = reference.chunked_gla(*(x.astype(jnp.float32) for x in (q, k, v)), jnp.asarray(g), chunk_size=64,
                              precision=jax.lax.Precision.HIGHEST)
  err = rel_err(o.astype(jnp.float32), ref)
  assert err < TOL, f"{segments} segments: {err:.2e} (seed {seed})"


@pytest.mark.gpu
@pytest.mark.parametrize("dim_k", [32, 64])
@pytest.mark.parametrize("num_chunks,segments",
                         [(1, 1), (64, 1), (2, 2), (65, 5), (64, 4), (196, 4), (196, 14)])
def test_gpu_state_pass_from_log_gate_writes_g(dim_k, num_chunks, segments):
  """The G that `state_pass_from_log_gate` writes for the output pass is XLA's chunk cumsum (fp32 sums of
  exact bf16 parts), and its states are `state_pass`'s from that G."""
  rng, seed = fresh_rng()
  _, k, v, g = random_inputs(rng, 1, 64 * num_chunks, 2, dim_k, 64)
  k, v, g = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), jnp.asarray(g)
  states, big_g = jax.jit(lambda *a: gpu_mosaic.state_pass_from_log_gate(*a, segments))(k, v, g)
  want_g = reference.chunk_local_cumsum(g, 64)
  np.testing.assert_allclose(big_g, want_g, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
  want = jax.jit(lambda *a: gpu_mosaic.state_pass(*a, segments))(k, v, want_g)
  for name, got, ref in zip(want._fields, states, want):
    err = rel_err(jnp.asarray(got, jnp.float32), jnp.asarray(ref, jnp.float32))
    assert err < 1e-3, f"{name}: {err:.2e} (seed {seed})"
