"""SREM: the crisscross scan orders each block sees, raster order before the final layer, the identity
depthwise conv, causality of the plain schedule and full receptive field of the crisscross one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dig_jax.models import dig as dig_module
from dig_jax.models import srem
from dig_jax.models.embeddings import unpatchify
from tests.models.test_support import build, inputs, normal, randomize_zero_params, tiny_config


@pytest.mark.parametrize("grid", [(4, 4), (2, 3), (3, 5)])
def test_schedule_orders_follow_the_four_cycle(grid):
  rows, cols = grid
  orders, final, grids = srem.block_scan_orders(9, grid, "crisscross")
  for i, order in enumerate(orders):
    np.testing.assert_array_equal(order, srem.expected_cycle_order(i, rows, cols), err_msg=f"block {i}")
    assert grids[i] == (grid if i % 4 < 2 else (cols, rows))
  # Independent spelled-out check of the first four on the grid's own index picture.
  picture = np.arange(rows * cols).reshape(rows, cols)
  np.testing.assert_array_equal(orders[1], picture[::-1, ::-1].reshape(-1))   # rotated 180 degrees
  np.testing.assert_array_equal(orders[2], picture.T.reshape(-1))             # transposed
  np.testing.assert_array_equal(orders[3], picture.T[::-1, ::-1].reshape(-1))
  for depth in (4, 8, 12, 28):
    final = srem.block_scan_orders(depth, grid, "crisscross")[1]
    np.testing.assert_array_equal(final, np.arange(rows * cols))
  for depth in (1, 2, 3, 5, 6, 7):
    final = srem.block_scan_orders(depth, grid, "crisscross")[1]
    tokens = jnp.asarray(final)[None, :, None].astype(jnp.float32)  # token at position j = raster index
    restored = np.asarray(srem.restore_raster(tokens, final))[0, :, 0]
    np.testing.assert_array_equal(restored, np.arange(rows * cols))


def test_flip_and_causal_schedules():
  orders, final, _ = srem.block_scan_orders(3, (2, 3), "flip")
  np.testing.assert_array_equal(orders[0], np.arange(6))
  np.testing.assert_array_equal(orders[1], np.arange(6)[::-1])
  np.testing.assert_array_equal(final, np.arange(6)[::-1])
  orders, final, _ = srem.block_scan_orders(3, (2, 3), "causal")
  assert all(np.array_equal(o, np.arange(6)) for o in orders) and np.array_equal(final, np.arange(6))


@pytest.mark.parametrize("impl", ["conv", "pallas"])
def test_blocks_see_the_cycle_and_final_layer_sees_raster(monkeypatch, impl):
  """Depth 5 on a non-square 2x3 token grid: blocks are the identity at init (adaLN-Zero and identity conv),
  so block i's input is the embedded tokens in scan order i; the final layer (made non-zero) must see
  raster order. Per-block layout: the recording below is a Python side effect, which a scan does not allow
  (tests/models/test_stacked_blocks.py shows the stacked layout computes the same function). "pallas"
  reorients inside its conv kernel (Pallas' interpreter here)."""
  cfg = tiny_config(depth=5, input_size=(4, 6), stack_blocks=False, dwconv_impl=impl)
  model = build(cfg)
  for var in (model.final_layer.linear.kernel, model.final_layer.adaln_modulation.kernel):
    var.set_value(0.3 * normal(1, var.get_value().shape))
  x, t, y = inputs(cfg)
  seen = []
  original_call = dig_module.DiGBlock.__call__

  def recording_call(self, tokens, c, grid, reorient):
    seen.append((tokens, tuple(grid)))
    return original_call(self, tokens, c, grid, reorient)

  monkeypatch.setattr(dig_module.DiGBlock, "__call__", recording_call)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    m = nnx.merge(graphdef, state)
    embedded = m.x_embedder(x) + m.pos_embed.get_value()
    c = m.t_embedder(t) + m.y_embedder(y)
    expected = unpatchify(m.final_layer(embedded, c), m.grid, m.patch_size, m.out_channels)
    return m(x, t, y), expected, embedded, [s[0] for s in seen]

  out, expected, embedded, block_inputs = run(state)
  assert len(block_inputs) == 5
  for i, tokens in enumerate(block_inputs):
    expected_tokens = np.asarray(embedded)[:, srem.expected_cycle_order(i, 2, 3)]
    np.testing.assert_array_equal(np.asarray(tokens), expected_tokens, err_msg=f"block {i}")
    assert seen[i][1] == ((2, 3) if i % 4 < 2 else (3, 2))
  assert np.abs(np.asarray(expected)).max() > 0.1
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)


def test_output_is_raster_for_depth_two():
  cfg = tiny_config(depth=2, input_size=(4, 6))
  model = build(cfg)
  for var in (model.final_layer.linear.kernel, model.final_layer.adaln_modulation.kernel):
    var.set_value(0.3 * normal(2, var.get_value().shape))
  x, t, y = inputs(cfg)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    m = nnx.merge(graphdef, state)
    c = m.t_embedder(t) + m.y_embedder(y)
    raster = m.final_layer(m.x_embedder(x) + m.pos_embed.get_value(), c)
    return m(x, t, y), unpatchify(raster, m.grid, m.patch_size, m.out_channels)

  out, expected = run(state)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)


def test_identity_dwconv_changes_nothing_and_random_init_does():
  x = normal(0, (2, 15, 8))
  conv = srem.DepthwiseConv(8, init="identity", rngs=nnx.Rngs(0), dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(conv(x, (3, 5))), np.asarray(x))
  kernel = np.asarray(conv.kernel.get_value())
  assert kernel.shape == (3, 3, 1, 8) and kernel[1, 1].min() == 1 and np.abs(kernel).sum() == 8
  random = srem.DepthwiseConv(8, init="random", rngs=nnx.Rngs(0), dtype=jnp.float32)
  assert np.abs(np.asarray(random.kernel.get_value())).max() <= 1 / 3
  assert not np.allclose(np.asarray(random(x, (3, 5))), np.asarray(x))


@pytest.mark.parametrize("impl", srem.DWCONV_IMPLS)
def test_dwconv_matches_torch_depthwise_conv_on_the_grid(impl):
  """Official: tokens -> (N, D, rows, cols) -> Conv2d(groups=D, padding=1); torch weight [D,1,3,3] -> HWIO."""
  n, rows, cols, d = 2, 3, 5, 4
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(n, rows * cols, d)).astype(np.float32)
  weight = rng.normal(size=(d, 1, 3, 3)).astype(np.float32)
  bias = rng.normal(size=(d,)).astype(np.float32)
  padded = np.pad(tokens.transpose(0, 2, 1).reshape(n, d, rows, cols), ((0, 0), (0, 0), (1, 1), (1, 1)))
  expected = np.zeros((n, d, rows, cols), np.float32)
  for r in range(rows):
    for c in range(cols):
      expected[:, :, r, c] = np.einsum("ndij,dij->nd", padded[:, :, r:r + 3, c:c + 3], weight[:, 0]) + bias
  conv = srem.DepthwiseConv(d, init="identity", rngs=nnx.Rngs(0), dtype=jnp.float32, impl=impl)
  conv.kernel.set_value(jnp.asarray(weight.transpose(2, 3, 1, 0)))
  conv.bias.set_value(jnp.asarray(bias))
  got = np.asarray(conv(jnp.asarray(tokens), (rows, cols)))
  np.testing.assert_allclose(got, expected.reshape(n, d, -1).transpose(0, 2, 1), atol=1e-5)


@pytest.mark.parametrize("kernel_size,grid", [(3, (3, 5)), (5, (6, 4))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_taps_conv_equals_grouped_conv_with_gradients(kernel_size, grid, dtype):
  """The "taps" forward and input gradient (shifted sums, the kernel rotated for the gradient) and its
  cuDNN-style weight gradient agree with XLA's grouped convolution under autodiff."""
  n, d = 2, 8
  x = normal(1, (n, *grid, d)).astype(dtype)
  kernel = normal(2, (kernel_size, kernel_size, 1, d)).astype(dtype)
  cotangent = normal(3, (n, *grid, d)).astype(dtype)

  def loss(impl):
    return lambda x, k: jnp.sum(srem.depthwise_conv(x, k, impl=impl).astype(jnp.float32) * cotangent)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  ref_out = srem.depthwise_conv(x, kernel, impl="conv").astype(jnp.float32)
  got_out = srem.depthwise_conv(x, kernel, impl="taps")
  assert got_out.dtype == dtype
  np.testing.assert_allclose(np.asarray(got_out.astype(jnp.float32)), np.asarray(ref_out), atol=tol, rtol=tol)
  ref = jax.grad(loss("conv"), argnums=(0, 1))(x, kernel)
  got = jax.grad(loss("taps"), argnums=(0, 1))(x, kernel)
  for name, a, b in zip(("dx", "dkernel"), got, ref):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    scale = float(jnp.abs(b.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)),
                               atol=tol * scale, rtol=tol, err_msg=name)


def test_taps_conv_on_a_token_grid_sharded_over_batch_and_rows():
  """Under `jax.jit` with the batch and the grid rows split over 8 devices (data x context), the taps conv and
  its gradients equal the unsharded grouped conv's (XLA exchanges the halo rows of the shifted slices)."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (the test suite's fake CPU devices)")
  mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "context"))
  x, kernel, cotangent = normal(4, (4, 8, 6, 16)), normal(5, (3, 3, 1, 16)), normal(6, (4, 8, 6, 16))

  def value_and_grads(impl):
    def loss(x, k):
      return jnp.sum(srem.depthwise_conv(x, k, impl=impl) * cotangent)
    return jax.value_and_grad(loss, argnums=(0, 1))
  x_sharded = jax.device_put(x, sharding)
  assert len(x_sharded.addressable_shards) == 8 and x_sharded.addressable_shards[0].data.shape == (2, 2, 6, 16)
  sharded = jax.jit(value_and_grads("taps"))(x_sharded, kernel)
  reference = value_and_grads("conv")(x, kernel)
  for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_auto_dwconv_impl_takes_the_pallas_kernel_on_gpus_only():
  assert [srem.resolve_dwconv_impl("auto", p) for p in ("gpu", "cuda", "cpu", "tpu")] == [
      "pallas", "pallas", "conv", "conv"]
  assert srem.resolve_dwconv_impl("taps", "cpu") == "taps" and srem.resolve_dwconv_impl("conv", "gpu") == "conv"
  assert srem.resolve_dwconv_impl("auto") == "conv"   # this test process: CPU


def test_unknown_dwconv_impl_is_rejected():
  with pytest.raises(ValueError, match="dwconv_impl"):
    srem.DepthwiseConv(8, init="identity", rngs=nnx.Rngs(0), dtype=jnp.float32, impl="winograd")
  with pytest.raises(ValueError, match="dwconv_impl"):
    srem.depthwise_conv(jnp.zeros((1, 3, 3, 2)), jnp.zeros((3, 3, 1, 2)), impl="fft")


def test_dig_with_other_conv_impls_equals_dig_with_grouped_conv():
  """The whole model (two blocks, crisscross grids incl. a transposed one) and its parameter gradients; with
  "pallas" the conv and the reorientation are one kernel (Pallas' interpreter here)."""
  results = {}
  for impl in ("conv", "taps", "pallas"):
    cfg = tiny_config(depth=2, patch_size=1, input_size=(3, 4), dwconv="random", dwconv_impl=impl)
    model = randomize_zero_params(build(cfg), seed=3)
    x, t, y = inputs(cfg, batch=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x, t, y) ** 2)  # noqa: E731
    results[impl] = jax.value_and_grad(loss)(params)
  loss_conv, grads_conv = results.pop("conv")
  for impl, (loss_other, grads_other) in results.items():
    np.testing.assert_allclose(float(loss_other), float(loss_conv), rtol=1e-5, err_msg=impl)
    for a, b in zip(jax.tree.leaves(grads_other), jax.tree.leaves(grads_conv)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=impl)


def _token_dependency(schedule: str, dwconv: str) -> np.ndarray:
  """[T_out, T_in] norms of d out / d x for a 2-block model with patch 1 on a 3x4 grid (raster indices)."""
  cfg = tiny_config(depth=2, patch_size=1, input_size=(3, 4), in_channels=2, learn_sigma=False,
                    cfg_channels=1, scan_schedule=schedule, dwconv=dwconv)
  model = randomize_zero_params(build(cfg), seed=3)
  x, t, y = inputs(cfg, batch=1)
  graphdef, state = nnx.split(model)
  jac = jax.jit(jax.jacrev(lambda x: nnx.merge(graphdef, state)(x, t, y)))(x)
  jac = np.asarray(jac).reshape(12, 2, 12, 2)
  return np.sqrt((jac ** 2).sum(axis=(1, 3)))


def test_causal_schedule_without_conv_is_causal_in_raster_order():
  dep = _token_dependency("causal", "off")
  assert np.all(dep[np.triu_indices(12, k=1)] == 0), "an output depends on a later token"
  assert np.all(dep[np.tril_indices(12)] > 0)


def test_crisscross_gives_every_output_every_input_after_two_blocks():
  dep = _token_dependency("crisscross", "identity")
  assert np.all(dep > 0)
