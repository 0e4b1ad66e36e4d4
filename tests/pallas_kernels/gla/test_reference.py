"""Tests of the pure-JAX GLA references (`recurrent_gla`, `chunked_gla`) against a float64 NumPy recurrence.

Inputs are fresh random draws every run (seed in the failure message); gates are -|g| with |g| log-uniform in
[1e-3, 10] per step, so some chunks decay by hundreds of nats. Tolerances: the references compute in float32
with HIGHEST-precision matmuls; 2e-5 relative (Frobenius) error against float64 leaves ~40x headroom over what
they reach.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gla import reference
from tests.pallas_kernels.gla.gla_test_utils import fresh_rng, numpy_gla, random_inputs, rel_err

HIGHEST = jax.lax.Precision.HIGHEST
FWD_TOL = 2e-5
GRAD_TOL = 1e-4


def _random_shape(rng, dk: int, dv: int, chunk: int) -> tuple[int, int, int, int, int]:
  """(B, T, H, K, V) with T never a multiple of the chunk (and sometimes shorter than one chunk)."""
  t = int(rng.integers(1, 3 * chunk))
  if t % chunk == 0:
    t += 1
  return int(rng.integers(1, 3)), t, int(rng.integers(1, 3)), dk, dv


@pytest.mark.parametrize("dk,dv", [(32, 64), (64, 64)])
@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_forward_matches_float64(dk, dv, chunk):
  rng, seed = fresh_rng()
  b, t, h, dk, dv = _random_shape(rng, dk, dv, chunk)
  q, k, v, g = random_inputs(rng, b, t, h, dk, dv)
  expected, _ = numpy_gla(q, k, v, g)
  got_rec = reference.recurrent_gla(q, k, v, g)
  got_chunk = reference.chunked_gla(q, k, v, g, chunk_size=chunk, precision=HIGHEST)
  assert got_rec.shape == expected.shape and got_chunk.dtype == jnp.float32
  assert rel_err(got_rec, expected) < FWD_TOL, (seed, (b, t, h, dk, dv))
  assert rel_err(got_chunk, expected) < FWD_TOL, (seed, (b, t, h, dk, dv, chunk))


def test_custom_scale_and_bf16_output_dtype():
  rng, seed = fresh_rng()
  q, k, v, g = random_inputs(rng, 1, 21, 2, 16, 8)
  expected, _ = numpy_gla(q, k, v, g, scale=0.3)
  got = reference.chunked_gla(q, k, v, g, chunk_size=8, scale=0.3, precision=HIGHEST)
  assert rel_err(got, expected) < FWD_TOL, seed
  got_bf16 = reference.chunked_gla(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), g, chunk_size=8)
  assert got_bf16.dtype == jnp.bfloat16


@pytest.mark.parametrize("chunk", [8, 32])
def test_initial_and_final_state(chunk):
  rng, seed = fresh_rng()
  b, t, h, dk, dv = 2, 3 * chunk // 2 + 3, 2, 32, 64
  q, k, v, g = random_inputs(rng, b, t, h, dk, dv)
  h0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32)
  expected_o, expected_s = numpy_gla(q, k, v, g, initial_state=h0)
  for o, s in (reference.recurrent_gla(q, k, v, g, initial_state=h0, return_final_state=True),
               reference.chunked_gla(q, k, v, g, chunk_size=chunk, initial_state=h0, return_final_state=True,
                                     precision=HIGHEST)):
    assert s.shape == (b, h, dk, dv) and s.dtype == jnp.float32
    assert rel_err(o, expected_o) < FWD_TOL, seed
    assert rel_err(s, expected_s) < FWD_TOL, seed


@pytest.mark.parametrize("dk,dv,chunk", [(32, 64, 16), (64, 64, 8)])
def test_chunked_gradients_match_recurrent(dk, dv, chunk):
  rng, seed = fresh_rng()
  b, t, h = 1, 2 * chunk + 5, 2
  q, k, v, g = random_inputs(rng, b, t, h, dk, dv)
  w = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)

  def grads(fn):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2, 3)))(q, k, v, g)

  want = grads(lambda *a: reference.recurrent_gla(*a))
  got = grads(lambda *a: reference.chunked_gla(*a, chunk_size=chunk, precision=HIGHEST))
  for name, a, r in zip(("dq", "dk", "dv", "dg"), got, want):
    assert rel_err(a, r) < GRAD_TOL, (name, seed)


def test_gate_gradient_matches_finite_difference_float64():
  """The gate gradient of the recurrence itself, against a central difference of the float64 oracle."""
  rng, seed = fresh_rng()
  q, k, v, g = random_inputs(rng, 1, 9, 1, 4, 3, gate_min=0.05, gate_max=2.0)
  w = rng.standard_normal((1, 9, 1, 3))
  loss = lambda g_: jnp.sum(reference.chunked_gla(q, k, v, g_, chunk_size=4, precision=HIGHEST) * w)
  grad = jax.grad(loss)(g)
  idx = tuple(rng.integers(0, n) for n in g.shape)
  eps = 1e-5
  g_plus, g_minus = g.astype(np.float64), g.astype(np.float64)
  g_plus[idx] += eps
  g_minus[idx] -= eps
  fd = (np.sum(numpy_gla(q, k, v, g_plus)[0] * w) - np.sum(numpy_gla(q, k, v, g_minus)[0] * w)) / (2 * eps)
  assert abs(float(grad[idx]) - fd) <= 1e-3 * max(1.0, abs(fd)), (seed, float(grad[idx]), fd)


@pytest.mark.parametrize("fn", [reference.recurrent_gla, reference.chunked_gla])
def test_bad_shapes_raise_value_error(fn):
  q = jnp.zeros((1, 8, 2, 4))
  v = jnp.zeros((1, 8, 2, 6))
  with pytest.raises(ValueError, match="batch, tokens, heads, dim"):
    fn(q[0], q[0], v[0], q[0])
  with pytest.raises(ValueError, match="one shape"):
    fn(q, jnp.zeros((1, 8, 2, 5)), v, q)
  with pytest.raises(ValueError, match="must match q"):
    fn(q, q, jnp.zeros((1, 7, 2, 6)), q)
  with pytest.raises(ValueError, match="initial_state"):
    fn(q, q, v, q, initial_state=jnp.zeros((1, 2, 6, 4)))


def test_bad_chunk_size_raises_value_error():
  x = jnp.zeros((1, 8, 1, 4))
  with pytest.raises(ValueError, match="chunk_size"):
    reference.chunked_gla(x, x, x, x, chunk_size=0)


def test_padding_helpers():
  x = jnp.ones((1, 5, 1, 2))
  padded = reference.pad_to_chunks(x, 4)
  assert padded.shape == (1, 8, 1, 2) and float(padded[:, 5:].sum()) == 0.0
  cum = reference.chunk_local_cumsum(-jnp.ones((1, 8, 1, 1)), 4)
  np.testing.assert_array_equal(np.asarray(cum[0, :, 0, 0]), [-1, -2, -3, -4, -1, -2, -3, -4])


@pytest.mark.parametrize("method", reference.CUMSUM_METHODS)
def test_chunk_local_cumsum_methods_match_float64_forward_and_transpose(method):
  rng = np.random.default_rng()
  g = -np.exp(rng.uniform(np.log(1e-3), np.log(10.0), (2, 96, 3, 5)))   # 3 chunks of 32
  ct = rng.standard_normal(g.shape)
  fn = jax.jit(lambda x: reference.chunk_local_cumsum(x, 32, method))
  got, vjp = jax.vjp(fn, jnp.asarray(g, jnp.float32))
  chunks = g.reshape(2, 3, 32, 3, 5)
  want = np.cumsum(chunks, axis=2).reshape(g.shape)
  # The transpose is the reverse cumsum inside each chunk.
  want_grad = np.flip(np.cumsum(np.flip(ct.reshape(chunks.shape), 2), axis=2), 2).reshape(g.shape)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-5)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(ct, jnp.float32))[0]), want_grad, rtol=2e-6, atol=1e-5)
  with pytest.raises(ValueError, match="cumsum method"):
    reference.chunk_local_cumsum(jnp.zeros((1, 4, 1, 1)), 4, "tree")


@pytest.mark.parametrize("t,chunk", [(64, 64), (10, 16), (33, 32)])
def test_jitted_chunked_matches_float64_including_single_chunk(t, chunk):
  """Under jit, one- and two-chunk sequences must be right too.

  Regression test: on jaxlib 0.11.2's CPU backend, a one-chunk scan over a zero initial state unrolls into a dot
  with a broadcast-zero operand that XLA's "ynn" fusion computes as garbage (values ~1e30); the reference peels
  the first chunk off the scan to avoid it.
  """
  rng, seed = fresh_rng()
  q, k, v, g = random_inputs(rng, 1, t, 2, 32, 64)
  expected, _ = numpy_gla(q, k, v, g)
  for _ in range(3):  # The bug was intermittent (uninitialised memory): repeat.
    got = jax.jit(lambda *a: reference.chunked_gla(*a, chunk_size=chunk, precision=HIGHEST))(q, k, v, g)
    assert rel_err(got, expected) < FWD_TOL, f"seed {seed}"
