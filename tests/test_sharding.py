"""Mesh construction, logical-axis resolution and batch sharding on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dig_jax import sharding

MESH_222 = [("data", 2), ("fsdp", 2), ("tensor", 2)]


class _TwoLayer(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.up = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)), rngs=rngs)
    self.down = nnx.Linear(16, 8, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)
    self.table = nnx.Param(jnp.zeros((11, 8)), out_sharding=("classes", "embed"))
    self.pos = nnx.Variable(jnp.zeros((4, 8)))


def test_mesh_resolves_minus_one_and_uses_auto_axes():
  mesh = sharding.create_mesh([("data", -1), ("fsdp", 2), ("tensor", 1), ("context", 1)])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1, "context": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("bad", [[("data", 3)], [("data", -1), ("fsdp", -1)], [("data", 2), ("data", 4)],
                                 [("data", -1), ("fsdp", 3)]])
def test_bad_mesh_gives_clear_error(bad):
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.create_mesh(bad)


def test_mesh_axis_no_rule_uses_is_one_clear_error():
  rules = sharding.DEFAULT_RULES
  sharding.check_mesh_axes_used(sharding.create_mesh(MESH_222 + [("context", 1)]), rules)  # size 1: fine
  with pytest.raises(ValueError, match=r"\['context'\].*not implemented"):
    sharding.check_mesh_axes_used(sharding.create_mesh([("data", 2), ("fsdp", 2), ("context", 2)]), rules)
  # The same axis is fine once a rule splits something over it.
  sharding.check_mesh_axes_used(sharding.create_mesh([("data", 2), ("fsdp", 2), ("context", 2)]),
                                rules + (("activation_length", "context"),))


def test_kernel_tagged_embed_mlp_is_sharded_fsdp_tensor():
  mesh = sharding.create_mesh(MESH_222)
  rules = sharding.DEFAULT_RULES
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = _TwoLayer(nnx.Rngs(0))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  shardings = sharding.state_shardings(params, mesh, rules)
  assert jax.tree.structure(shardings) == jax.tree.structure(nnx.to_pure_dict(params))
  assert shardings["up"]["kernel"].spec == P("fsdp", "tensor")
  assert shardings["up"]["bias"].spec == P("tensor")
  assert shardings["down"]["kernel"].spec == P("tensor", "fsdp")
  # 11 rows do not split: "classes" has no mesh axis anyway, "embed" (8) splits over fsdp.
  assert shardings["table"].spec == P(None, "fsdp")
  # Placing the params with these shardings gives per-device shards of the expected shape.
  placed = jax.device_put(nnx.to_pure_dict(params), shardings)
  assert placed["up"]["kernel"].addressable_shards[0].data.shape == (4, 8)
  assert sharding.state_shardings(rest, mesh, rules)["pos"].spec == P()


def test_rules_skip_used_axes_and_non_dividing_axes():
  mesh = sharding.create_mesh(MESH_222)
  rules = sharding.logical_axis_rules([["embed", ["fsdp", "tensor"]], ["mlp", "tensor"], ["heads", "tensor"]])
  # "mlp" wants tensor, which "embed" already took: the second dimension stays replicated.
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), rules, mesh, (8, 8)) == P(("fsdp", "tensor"), None)
  # 6 is divisible by fsdp (2) but not by fsdp*tensor (4): tensor is dropped for that array.
  assert sharding.logical_to_mesh_spec(("embed", None), rules, mesh, (6, 3)) == P("fsdp", None)
  assert sharding.logical_to_mesh_spec(("unknown_name",), rules, mesh, (8,)) == P(None)


def test_batch_sharding_and_divisibility():
  mesh = sharding.create_mesh(MESH_222)
  rules = sharding.DEFAULT_RULES
  assert sharding.num_batch_shards(mesh, rules) == 4
  assert sharding.batch_sharding(mesh, rules, 4).spec == P(("data", "fsdp"), None, None, None)
  local = {"image": np.ones((8, 2, 2, 1), np.float32), "label": np.arange(8)}
  batch = sharding.host_to_global(local, mesh, rules)
  assert batch["image"].shape == (8, 2, 2, 1)
  assert batch["image"].addressable_shards[0].data.shape == (2, 2, 2, 1)
  np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(8))
  sharding.check_global_batch(8, mesh, rules)
  with pytest.raises(ValueError, match="not divisible by the 4 data-parallel devices"):
    sharding.check_global_batch(6, mesh, rules)
