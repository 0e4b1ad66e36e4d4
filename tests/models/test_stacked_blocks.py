"""`model.stack_blocks`: stacked block parameters run with lax.scan compute the same function as the
per-block model (forward and parameter gradients), for DiG's crisscross orders on square and non-square
grids, a depth that leaves a shorter last group, DiT, remat, loops and full unrolling; bad configs fail with
one clear error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dig_jax.models import logical_axis_names
from dig_jax.models.backbone import stack_block_params, unstack_block_params
from tests.models.test_support import build, inputs, tiny_config

CASES = {
    # name: (arch, overrides). 4x4 token grid: crisscross repeats every 2 blocks (depth 3: one group of 2,
    # then a group of 1); 4x6: every 4. scan_unroll=0 (default): no loop; N >= 1: N groups per iteration.
    "dig_square_unrolled": ("dig", dict(depth=3)),
    "dig_non_square_loop": ("dig", dict(depth=4, input_size=(8, 12), scan_unroll=1)),
    "dig_flip_remat_loop": ("dig", dict(depth=3, scan_schedule="flip", remat="block", scan_unroll=2)),
    "dit": ("dit", dict(depth=2, attention_impl="xla")),
}


def _random_params(model, seed):
  """Every Param of the per-block model drawn afresh (zero-initialised layers too), as a pure dict. Drawn with
  NumPy: eager jax.random and adds would compile a few small programs per parameter shape."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  pure = jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.2 * rng.standard_normal(p.shape), p.dtype),
                      nnx.to_pure_dict(params))
  return pure, rest


def _model_without_params(cfg):
  """A model whose Params are only shapes (the test supplies every parameter): graph and Params from
  nnx.eval_shape, the other state (pos_embed) computed under one jit, in which XLA drops the unused parameter
  draws. Built eagerly, each new stacked [depth, ...] shape would compile its initializer."""
  graphdef, params, _ = nnx.split(nnx.eval_shape(lambda: build(cfg, seed=1)), nnx.Param, ...)
  rest = jax.jit(lambda: nnx.split(build(cfg, seed=1), nnx.Param, ...)[2])()
  return nnx.merge(graphdef, params, rest)


@pytest.mark.parametrize("case", sorted(CASES))
def test_stacked_blocks_compute_the_same_function_and_gradients(case):
  arch, overrides = CASES[case]
  cfg = tiny_config(arch, hidden_size=32, stack_blocks=False, **overrides)
  per_block = build(cfg)
  stacked = _model_without_params(tiny_config(arch, hidden_size=32, **overrides))
  params, rest = _random_params(per_block, seed=2)
  x, t, y = inputs(cfg, seed=3)

  def loss(model, pure_params):
    graphdef, abstract, model_rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(abstract, pure_params)
    out = nnx.merge(graphdef, abstract, model_rest)(x, t, y)
    return jnp.sum(out * jnp.cos(out)), out

  (value_a, out_a), grads_a = jax.jit(jax.value_and_grad(lambda p: loss(per_block, p), has_aux=True))(params)
  stacked_params = stack_block_params(params, cfg.depth)
  (value_b, out_b), grads_b = jax.jit(jax.value_and_grad(lambda p: loss(stacked, p), has_aux=True))(
      stacked_params)
  assert float(jnp.abs(out_a).mean()) > 0.05
  np.testing.assert_allclose(np.asarray(out_b), np.asarray(out_a), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(float(value_b), float(value_a), rtol=1e-5)
  grads_b = unstack_block_params(grads_b)
  flat_a = jax.tree_util.tree_flatten_with_path(grads_a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(grads_b)[0])
  assert len(flat_a) == len(flat_b)
  for path, grad in flat_a:
    # fp32 sums in another order: errors relative to the largest entry of the leaf.
    scale = float(np.abs(np.asarray(grad)).max()) + 1e-6
    np.testing.assert_allclose(np.asarray(flat_b[path]), np.asarray(grad), rtol=1e-4, atol=2e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  # The per-block orders matter: running every block in block 0's orientation changes the output.
  if case == "dig_square_unrolled":
    swapped = jax.tree.map(lambda a: a[jnp.array([1, 0, 2])], stacked_params["blocks"])
    out_swapped = jax.jit(lambda p: loss(stacked, p)[1])({**stacked_params, "blocks": swapped})
    assert float(jnp.abs(out_swapped - out_b).max()) > 1e-3


def test_stacked_parameters_carry_the_layers_axis_and_round_trip():
  cfg = tiny_config(depth=4)
  model = build(cfg)
  axes = logical_axis_names(model)
  assert axes["blocks/attn/q_proj/kernel"] == ("layers", "embed", "heads")
  assert axes["blocks/dw_conv/kernel"] == ("layers", "conv", "conv", None, "embed")
  assert "x_embedder/proj/kernel" in axes and not any(p.startswith("blocks/0/") for p in axes)
  assert nnx.state(model)["blocks"]["mlp"]["down_proj"]["kernel"].get_value().shape == (4, 256, 64)
  # Blocks are initialised independently (split rngs), not copies of one block.
  q = np.asarray(nnx.state(model)["blocks"]["attn"]["q_proj"]["kernel"].get_value())
  assert not np.allclose(q[0], q[1])
  pure = nnx.to_pure_dict(nnx.state(model))
  back = stack_block_params(unstack_block_params(pure), 4)
  jax.tree.map(np.testing.assert_array_equal, back, pure)
  with pytest.raises(ValueError, match="blocks 0..2"):
    stack_block_params(unstack_block_params(pure), 3)


@pytest.mark.parametrize("overrides,match", [
    (dict(stack_blocks=1), "stack_blocks must be True or False"),
    (dict(scan_unroll=-1), r"scan_unroll must be an int >= 0"),
    (dict(scan_unroll=True), r"scan_unroll must be an int >= 0"),
])
def test_bad_scan_configs_raise_one_clear_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    tiny_config(**overrides)
