"""Parameter creation with logical axis names, and helpers that read them back (names, parameter counts).

Every parameter of the DiG/DiT models is created through `make_variable`, which attaches the logical axis
names as the `out_sharding` metadata that flax 0.12.10 reads (`nnx.get_partition_spec`,
`nnx.get_named_sharding`, `nnx.get_abstract_model`). The sharding module maps the names below to mesh axes;
models only annotate.

Eager sharding (FLIP 4844) is used only when it can work: if `nnx.using_eager_sharding()` is on *and* a mesh
is active (`jax.set_mesh`), variables are sharded as they are created, so create the model inside
`nnx.logical_axis_rules(rules)` whose rules cover every name in `LOGICAL_AXIS_NAMES` (a name without a rule is
taken as a mesh axis name by flax). Without a mesh (CPU tests, `nnx.eval_shape` for parameter counts, the
converter) the variables are created unsharded but keep the same metadata.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The logical axis names used on parameters (None = replicated).
EMBED = "embed"            # hidden size D
MLP = "mlp"                # SwiGLU / GELU inner size
HEADS = "heads"            # projection dims that are heads x head_dim (q/k/v/g/o inner)
CLASSES = "classes"        # label-table rows
PATCH = "patch"            # patch-embedding input features (p*p*C)
GATE_RANK = "gate_rank"    # the 16-dim low-rank forget-gate bottleneck
CONV = "conv"              # depthwise-conv kernel taps
MODULATION = "modulation"  # the 6D / 2D adaLN outputs
LAYERS = "layers"          # the block axis of stacked block parameters (model.stack_blocks)
LOGICAL_AXIS_NAMES = (EMBED, MLP, HEADS, CLASSES, PATCH, GATE_RANK, CONV, MODULATION, LAYERS)

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
Axes = tuple[str | None, ...]


class SinCosPosEmbed(nnx.Variable):
  """The fixed 2-D sin-cos positional table: a Variable that is *not* an `nnx.Param`.

  Optimizers built with `wrt=nnx.Param` and `nnx.DiffState(..., nnx.Param)` gradients never touch it; it is
  still part of `nnx.state(model)` (checkpoints) and counted by `count_params` as the official code counts it.
  """


def eager_sharding_active() -> bool:
  """True when variables can (and should) be sharded at creation: eager sharding on and a mesh installed."""
  return bool(nnx.using_eager_sharding()) and not jax.sharding.get_abstract_mesh().empty


def make_variable(value: jax.Array, axes: Sequence[str | None],
                  variable_type: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
  """Wraps `value` in `variable_type` with logical axis names `axes` (one per dim)."""
  axes = tuple(axes)
  if len(axes) != value.ndim:
    raise ValueError(f"logical axes {axes} do not match a parameter of shape {value.shape}")
  bad = [a for a in axes if a is not None and a not in LOGICAL_AXIS_NAMES]
  if bad:
    raise ValueError(f"unknown logical axis names {bad}; allowed: {LOGICAL_AXIS_NAMES} or None")
  return variable_type(value, out_sharding=axes, eager_sharding=eager_sharding_active())


def make_param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
               axes: Sequence[str | None]) -> nnx.Param:
  """A float32 `nnx.Param` of `shape` drawn from `init` with the `params` stream of `rngs`."""
  return make_variable(init(rngs.params(), tuple(shape), jnp.float32), axes)


# Initializers. Fans are given explicitly so that fused / reshaped kernels are initialised exactly like the
# PyTorch 2-D weight they correspond to.


def xavier_uniform(fan_in: int, fan_out: int, gain: float = 1.0) -> Initializer:
  """torch.nn.init.xavier_uniform_ for a weight with these fans: U(-a, a), a = gain * sqrt(6 / (in + out))."""
  bound = gain * float(np.sqrt(6.0 / (fan_in + fan_out)))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
  return init


def uniform(bound: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
  return init


def normal(std: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)
  return init


def zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def ones(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


# Reading the metadata back.


def _as_state(model_or_state: Any) -> Any:
  return nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def path_str(path: tuple[Any, ...]) -> str:
  """A JAX tree path as "blocks/3/attn/q_proj/kernel" (dict keys, sequence indices, attributes alike)."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        key = getattr(key, attr)
        break
    parts.append(str(key))
  return "/".join(parts)


def flat_variables(model_or_state: Any) -> dict[str, Any]:
  """{"blocks/3/attn/q_proj/kernel": leaf} for every leaf (Variables kept as Variables)."""
  leaves = jax.tree_util.tree_flatten_with_path(_as_state(model_or_state), is_leaf=_is_variable)[0]
  flat = {}
  for path, leaf in leaves:
    name = path_str(path)
    if name.endswith("/value"):  # A pure-dict / raw-state leaf sits one level below its Variable.
      name = name[: -len("/value")]
    flat[name] = leaf
  return flat


def logical_axis_names(model_or_state: Any) -> dict[str, Axes]:
  """{parameter path: logical axis names} for every Variable of a model (or its, possibly abstract, state)."""
  names = {}
  for path, leaf in flat_variables(model_or_state).items():
    if not _is_variable(leaf):
      raise ValueError(f"{path} is not an nnx.Variable; pass the model or nnx.state(model)")
    axes = leaf.get_metadata().get("out_sharding")
    names[path] = None if axes is None else tuple(axes)
  return names


def count_params(model_or_abstract_state: Any, include_pos_embed: bool = True) -> int:
  """Number of parameters (`nnx.Param`s, plus the fixed sin-cos table unless `include_pos_embed=False`).

  Accepts a model, `nnx.state(model)`, the abstract state from `nnx.eval_shape` (no memory needed), or a pure
  dict of arrays (then every leaf counts, and the table is recognised by its path ending in `pos_embed`).
  Other non-Param Variables (none exist in these models) are not counted.
  """
  total = 0
  for path, leaf in flat_variables(model_or_abstract_state).items():
    is_pos = isinstance(leaf, SinCosPosEmbed) or path.split("/")[-1] == "pos_embed"
    if is_pos and not include_pos_embed:
      continue
    if _is_variable(leaf):
      if not (isinstance(leaf, nnx.Param) or isinstance(leaf, SinCosPosEmbed)):
        continue
      leaf = leaf.get_value()
    total += int(np.prod(leaf.shape))
  return total
