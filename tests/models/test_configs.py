"""Model configs, parameter counts (no memory, via nnx.eval_shape) and logical axis annotations."""
import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dig_jax.models import (LOGICAL_AXIS_NAMES, SinCosPosEmbed, count_params, create_model,
                            logical_axis_names, model_config_for, resolve_model_config)

# Official sizes at 256^2 (latent 32x32x4), 1000 classes, learn_sigma, pos table included (dig_spec.md §1).
EXPECTED_MILLIONS = {
    "DiG-S/2": 33.08, "DiG-B/2": 130.75, "DiG-L/2": 465.02, "DiG-XL/2": 675.95,
    "DiT-S/2": 32.96, "DiT-B/2": 130.51, "DiT-L/2": 458.10, "DiT-XL/2": 675.13,
}
# Without the frozen pos_embed (DiG only, from the spec).
EXPECTED_NO_POS = {"DiG-S/2": 32.98, "DiG-B/2": 130.55, "DiG-L/2": 464.76, "DiG-XL/2": 675.66}


def abstract(name, **overrides):
  cfg = model_config_for(name, **overrides)
  return nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name", sorted(EXPECTED_MILLIONS))
def test_parameter_counts_match_official(name):
  model = abstract(name)
  assert round(count_params(model) / 1e6, 2) == EXPECTED_MILLIONS[name]
  if name in EXPECTED_NO_POS:
    assert round(count_params(model, include_pos_embed=False) / 1e6, 2) == EXPECTED_NO_POS[name]
  # The abstract state works too, and so does a pure dict of shapes.
  assert count_params(nnx.state(model)) == count_params(model)


def test_size_table_and_head_counts():
  assert model_config_for("DiG-XL/2").num_heads == 18
  assert model_config_for("DiT-XL/2").num_heads == 16
  cfg = model_config_for("DiT-L/4")
  assert (cfg.arch, cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == ("dit", 24, 1024, 16, 4)
  cfg = model_config_for("DiG-B/8", input_size=(32, 48))
  got = (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.input_size)
  assert got == (12, 768, 12, 8, (32, 48))
  # Zero sizes are filled from the size table.
  resolved = resolve_model_config({"arch": "dig", "size": "XL"})
  assert (resolved.depth, resolved.hidden_size, resolved.num_heads) == (28, 1152, 18)
  # DiT-XL/4 matches DiT's published 675 M-class size with fewer pos-table rows.
  assert count_params(abstract("DiT-XL/4"), include_pos_embed=False) < count_params(abstract("DiT-XL/2"))


@pytest.mark.parametrize("bad", [
    dict(name="DiG-M/2"), dict(name="DiG-S/3"), dict(name="DiG-S/2", typo_field=1),
    dict(name="DiG-S/2", scan_schedule="zigzag"), dict(name="DiG-S/2", input_size=33),
    dict(name="DiG-S/2", dwconv="zero"), dict(name="DiG-S/2", num_heads=5),
    dict(name="DiT-S/2", dtype="float16"), dict(name="DiG-S/2", cfg_channels=9),
    dict(name="DiG-S/2", gla_fused_gate="yes"),
])
def test_bad_configs_are_rejected(bad):
  bad = dict(bad)
  with pytest.raises(ValueError):
    model_config_for(bad.pop("name"), **bad)


def test_unknown_field_in_a_config_dict_is_rejected():
  cfg = model_config_for("DiG-S/2").to_dict()
  cfg["num_layers"] = 3
  with pytest.raises(ValueError, match="unknown model config fields"):
    create_model(cfg, rngs=nnx.Rngs(0))


def _check_axes(model):
  names = logical_axis_names(model)
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  assert len(names) == len(flat) > 0
  for path, axes in names.items():
    assert axes is not None, path
    value = flat[tuple(int(p) if p.isdigit() else p for p in path.split("/"))].get_value()
    assert len(axes) == value.ndim, (path, axes, value.shape)
    assert all(a is None or a in LOGICAL_AXIS_NAMES for a in axes), (path, axes)
  return names


def test_every_parameter_has_allowed_logical_axes():
  dig = _check_axes(abstract("DiG-S/2", depth=2, hidden_size=64, num_heads=2, input_size=8, norm="rmsnorm"))
  dit = _check_axes(abstract("DiT-S/2", depth=1, hidden_size=64, num_heads=2, input_size=8))
  # Stacked blocks (the default): every block parameter leads with the "layers" axis.
  assert dig["blocks/attn/q_proj/kernel"] == ("layers", "embed", "heads")
  assert dig["blocks/attn/o_proj/kernel"] == ("layers", "heads", "embed")
  assert dig["blocks/attn/gk_proj_down/kernel"] == ("layers", "embed", "gate_rank")
  assert dig["blocks/mlp/gate_proj/kernel"] == ("layers", "embed", None, "mlp")
  assert dig["blocks/dw_conv/kernel"] == ("layers", "conv", "conv", None, "embed")
  assert dig["blocks/adaln_modulation/kernel"] == ("layers", "embed", "modulation")
  assert dig["blocks/norm1/weight"] == ("layers", "embed")
  per_block = _check_axes(abstract("DiG-S/2", depth=2, hidden_size=64, num_heads=2, input_size=8,
                                   stack_blocks=False))
  assert per_block["blocks/1/attn/q_proj/kernel"] == ("embed", "heads")
  assert dig["x_embedder/proj/kernel"] == ("patch", "embed")
  assert dig["y_embedder/embedding_table"] == ("classes", "embed")
  assert dit["blocks/attn/qkv/kernel"] == ("layers", "embed", None, "heads")
  assert dit["blocks/mlp/fc1/kernel"] == ("layers", "embed", "mlp")
  # flax's own reader returns the same logical names (no rules active).
  spec = nnx.get_partition_spec(nnx.state(abstract("DiT-S/2", depth=1, hidden_size=64, num_heads=2,
                                                   input_size=8)))
  assert spec["blocks"]["mlp"]["fc1"]["kernel"].get_value() == P("layers", "embed", "mlp")


def test_pos_embed_is_a_frozen_variable_not_a_param():
  model = abstract("DiG-S/2", depth=1, hidden_size=64, num_heads=2, input_size=8)
  assert isinstance(model.pos_embed, SinCosPosEmbed) and not isinstance(model.pos_embed, nnx.Param)
  assert model.pos_embed.get_value().shape == (1, 16, 64)
  params = nnx.state(model, nnx.Param)
  assert "pos_embed" not in params
  assert count_params(model) - count_params(model, include_pos_embed=False) == 16 * 64
  assert count_params(params) == count_params(model, include_pos_embed=False)


def test_abstract_model_under_a_mesh_and_rules_is_sharded_by_logical_names():
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("classes", None), ("patch", None),
           ("gate_rank", None), ("conv", None), ("modulation", "tensor"), ("layers", None))
  cfg = model_config_for("DiG-S/2", depth=2, hidden_size=64, num_heads=2, input_size=8)
  with nnx.logical_axis_rules(rules):  # eval_shape under a mesh: eager sharding runs, nothing is allocated.
    _, state = nnx.get_abstract_model(lambda: create_model(cfg, rngs=nnx.Rngs(0)), mesh)
  attn = state["blocks"]["attn"]
  assert attn["q_proj"]["kernel"].get_value().sharding.spec == P(None, "fsdp", "tensor")
  assert attn["o_proj"]["kernel"].get_value().sharding.spec == P(None, "tensor", "fsdp")
  assert state["blocks"]["dw_conv"]["kernel"].get_value().sharding.spec == P(None, None, None, None, "fsdp")
  gate_proj = state["blocks"]["mlp"]["gate_proj"]["kernel"].get_value()
  assert gate_proj.shape == (2, 64, 2, 256) and gate_proj.sharding.spec == P(None, "fsdp", None, "tensor")
