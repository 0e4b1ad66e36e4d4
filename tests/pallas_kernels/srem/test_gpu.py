"""Tests of SREM's fused depthwise conv + reorientation (`pallas_kernels.srem.reference`, `gpu`).

The reorientations are checked against the model's own (`dig_jax.models.srem.reorient_tokens`, which the
DiG tests check against the documented 4-cycle). The kernel runs through the Pallas interpreter on CPU
against `reference.conv_reorient` (XLA's grouped conv at HIGHEST precision, then a gather), forward and the
gradients of x, the kernel and the bias, on fresh random inputs (seed in the failure message): square and
non-square grids, a T and a D that are not multiples of the tiles (masked tails), k = 3 and 5, fp32 and bf16.
Tolerances (relative Frobenius error): 1e-5 in fp32 (the same products, summed in another order); 1e-2 in
bf16, where both round their fp32 result to bf16 once. A lowering test turns both kernels into Triton IR for
an H100; the `gpu` tests run them compiled at DiG-S/2's shapes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dig_jax.models import srem as model_srem
from pallas_kernels.srem import gpu, ops, reference
from tests.pallas_kernels.gla.gla_test_utils import fresh_rng, rel_err, target_h100_for_triton_lowering


@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (2, 7)])
@pytest.mark.parametrize("reorient", reference.REORIENTATIONS)
def test_source_positions_and_next_grid_follow_the_model(grid, reorient):
  tokens = np.arange(grid[0] * grid[1])[None, :, None]
  moved, new_grid = model_srem.reorient_tokens(tokens, grid, reorient)
  np.testing.assert_array_equal(moved[0, :, 0], reference.source_positions(grid, reorient))
  assert reference.next_grid(grid, reorient) == tuple(new_grid)
  j = jnp.arange(grid[0] * grid[1], dtype=jnp.int32)
  source = np.asarray(gpu._source_position(j, grid, reorient))
  np.testing.assert_array_equal(source, reference.source_positions(grid, reorient))
  np.testing.assert_array_equal(np.asarray(gpu._target_position(jnp.asarray(source), grid, reorient)), j)


def _inputs(rng, n, grid, d, k, dtype):
  x = jnp.asarray(rng.standard_normal((n, grid[0] * grid[1], d)), dtype)
  kernel = jnp.asarray(rng.standard_normal((k, k, d)) / k, dtype)
  bias = jnp.asarray(rng.standard_normal((d,)), dtype)
  dout = jnp.asarray(rng.standard_normal(x.shape), dtype)
  return x, kernel, bias, dout


def _value_and_grads(fn, x, kernel, bias, dout):
  out, vjp = jax.vjp(fn, x, kernel, bias)
  return (out, *vjp(dout))


def _compare(n, grid, d, k, reorient, dtype, tol, interpret=True):
  rng, seed = fresh_rng()
  x, kernel, bias, dout = _inputs(rng, n, grid, d, k, dtype)
  kernel_fn = lambda x, w, b: gpu.conv_reorient(x, w, b, grid=grid, reorient=reorient, interpret=interpret)
  got = jax.jit(lambda *a: _value_and_grads(kernel_fn, *a))(x, kernel, bias, dout)
  up = [a.astype(jnp.float32) for a in (x, kernel, bias, dout)]
  want = _value_and_grads(lambda x, w, b: reference.conv_reorient(x, w, b, grid=grid, reorient=reorient), *up)
  for name, g, w, arg in zip(("out", "dx", "dkernel", "dbias"), got, want, (x, x, kernel, bias)):
    assert g.shape == arg.shape and g.dtype == arg.dtype, name
    err = rel_err(np.asarray(g, np.float32), np.asarray(w))
    assert err < tol, (name, err, seed, grid, d, k, reorient, dtype)


@pytest.mark.parametrize("reorient", reference.REORIENTATIONS)
def test_interpret_matches_reference_fp32_non_square(reorient):
  _compare(2, (5, 6), 80, 3, reorient, jnp.float32, 1e-5)   # T 30 (one masked token tile), D 80 (two)


def test_interpret_matches_reference_k5_and_bf16():
  _compare(1, (4, 7), 24, 5, "flip_transpose", jnp.float32, 1e-5)
  _compare(2, (6, 6), 16, 3, "flip", jnp.bfloat16, 1e-2)


def test_interpret_over_several_token_tiles():
  _compare(1, (12, 23), 16, 3, "flip_transpose", jnp.float32, 1e-5)   # T 276: three tiles of 128


def test_clear_errors_for_bad_shapes_and_names():
  x = jnp.zeros((1, 12, 8))
  with pytest.raises(ValueError, match="does not hold 12 tokens"):
    gpu.conv_reorient(x, jnp.zeros((3, 3, 8)), jnp.zeros(8), grid=(3, 5), reorient="flip")
  with pytest.raises(ValueError, match="unsupported"):
    gpu.conv_reorient(x, jnp.zeros((2, 2, 8)), jnp.zeros(8), grid=(3, 4), reorient="flip")
  with pytest.raises(ValueError, match="unknown reorientation"):
    gpu.conv_reorient(x, jnp.zeros((3, 3, 8)), jnp.zeros(8), grid=(3, 4), reorient="transpose")
  with pytest.raises(ValueError, match="unknown reorientation"):
    model_srem.reorient_tokens(x, (3, 4), "transpose")


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_lowers_to_triton_for_h100(monkeypatch):
  target_h100_for_triton_lowering(monkeypatch)
  x = jax.ShapeDtypeStruct((32, 256, 384), jnp.bfloat16)
  kernel, bias = jax.ShapeDtypeStruct((3, 3, 384), jnp.bfloat16), jax.ShapeDtypeStruct((384,), jnp.bfloat16)

  def loss(x, w, b):
    return gpu.conv_reorient(x, w, b, grid=(16, 16), reorient="flip_transpose").astype(jnp.float32).sum()

  traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, kernel, bias)
  lowered = traced.lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("xla.gpu.triton") == 2   # one kernel forward, one backward


@pytest.mark.gpu
@pytest.mark.parametrize("n,grid", [(32, (16, 16)), (2, (112, 112)), (3, (24, 40))])
@pytest.mark.parametrize("reorient", ["flip", "flip_transpose"])
def test_gpu_matches_reference_bf16(n, grid, reorient):
  """DiG-S/2's 256 and 1792 px token grids (D 384) and a non-square one, compiled."""
  _compare(n, grid, 384, 3, reorient, jnp.bfloat16, 1e-2, interpret=False)


@pytest.mark.gpu
def test_gpu_matches_reference_fp32():
  _compare(4, (16, 16), 384, 3, "flip_transpose", jnp.float32, 1e-5, interpret=False)


def _batch_mesh(axis_type):
  return jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(axis_type,) * 2)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_on_a_mesh_each_device_runs_its_images_and_gradients_match(axis_type):
  """Batch split over "data" (8 fake CPU devices, 4 x 2): the kernel runs per shard under shard_map (no
  all-gather of x), and the output and the gradients (the kernel's and the bias' summed over shards) equal
  the unsharded call's."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (the test suite's fake CPU devices)")
  rng, seed = fresh_rng()
  x, kernel, bias, dout = _inputs(rng, 8, (3, 5), 16, 3, jnp.float32)
  fn = lambda x, w, b: ops.conv_reorient(x, w, b, grid=(3, 5), reorient="flip_transpose", interpret=True)
  value_and_grads = jax.jit(lambda *a: _value_and_grads(fn, *a))
  want = value_and_grads(x, kernel, bias, dout)
  mesh = _batch_mesh(axis_type)
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", None, None)))  # noqa: E731
  args = (shard(x), kernel, bias, shard(dout))
  with jax.set_mesh(mesh):
    compiled = value_and_grads.lower(*args).compile()
    got = compiled(*args)
  assert "all-gather" not in compiled.as_text()
  assert got[0].sharding.spec[0] in ("data", ("data",))
  for name, g, w in zip(("out", "dx", "dkernel", "dbias"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=f"{name} {seed}")
