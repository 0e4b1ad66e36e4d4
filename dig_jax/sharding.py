"""Device mesh, logical-axis rules and the shardings of parameters, optimizer state and batches.

Everything that knows about physical devices lives here. The models tag each parameter with *logical* axis
names (``embed``, ``mlp``, ``heads``, ``classes``, ``patch``, ``gate_rank``, ``conv``, ``modulation``,
``layers`` (stacked blocks) or ``None``) in their NNX ``out_sharding`` metadata; a config maps those names to
*mesh* axes, so the same model runs data-parallel, FSDP or tensor-parallel by changing two config fields:

- ``config.mesh``: a list of ``(axis_name, size)`` pairs, one size may be -1 ("all remaining devices"), e.g.
  ``[("data", -1), ("fsdp", 1), ("tensor", 1), ("context", 1)]``. The mesh is built with ``jax.make_mesh`` and
  **Auto** axis types (JAX 0.11 defaults to Explicit, which the logical-rule workflow and
  ``with_sharding_constraint`` do not want).
- ``config.logical_axis_rules``: ``(logical_name, mesh_axis | (mesh_axes...) | None)`` pairs in priority
  order (the flax convention: the first rule whose mesh axes are still free for that array wins).
  ``activation_batch`` names the mesh axes the batch dimension is split over.

Deliberate deviations from flax's own resolver (``nnx.get_named_sharding``):
- a logical name without a rule is *replicated* rather than used literally as a mesh axis name;
- a mesh axis whose size does not divide the array dimension is dropped for that array (logged), so small
  tables such as the class embedding (1001 rows) never break a mesh; flax would fail at jit time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

BATCH_AXIS = "activation_batch"
DEFAULT_MESH = (("data", -1), ("fsdp", 1), ("tensor", 1), ("context", 1))
DEFAULT_RULES: Rules = (
    (BATCH_AXIS, ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("classes", None),
    ("patch", None),
    ("gate_rank", None),
    ("conv", None),
    ("modulation", None),
    ("layers", None),
)
_SHARDING_METADATA_KEYS = ("out_sharding", "sharding_names", "sharding")


def mesh_shape(mesh_config: Sequence[Sequence[Any]],
               num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves ``[(name, size), ...]`` (one size may be -1) against `num_devices`; returns (names, sizes)."""
  names = tuple(str(name) for name, _ in mesh_config)
  sizes = [int(size) for _, size in mesh_config]
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh has repeated axis names: {names}.")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh may have at most one axis of size -1, got {list(mesh_config)}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh sizes must be positive or -1, got {list(mesh_config)}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh {list(mesh_config)}: the fixed axes ({known} devices) do not divide the "
                       f"{num_devices} available devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {list(mesh_config)} uses {math.prod(sizes)} devices but {num_devices} are "
                     "available; use -1 for one axis to take the rest.")
  return names, tuple(sizes)


def create_mesh(mesh_config: Sequence[Sequence[Any]] = DEFAULT_MESH,
                devices: Sequence[Any] | None = None) -> Mesh:
  """Builds an Auto-typed mesh from ``[(axis_name, size), ...]`` over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def logical_axis_rules(rules: Sequence[Sequence[Any]] | None = None) -> Rules:
  """Normalises config rules (lists from JSON, tuples from Python) into a hashable tuple of pairs."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"Each logical_axis_rules entry must be (logical_name, mesh_axes), got {rule!r}.")
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(str(a) for a in axes) or None
    out.append((str(name), axes))
  return tuple(out)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh_spec(logical_axes: Sequence[str | None] | None, rules: Rules, mesh: Mesh,
                         shape: Sequence[int] | None = None) -> P:
  """Maps one array's logical axis names to a PartitionSpec over `mesh` (see the module docstring)."""
  if not logical_axes:
    return P()
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(f"Logical axes {tuple(logical_axes)} do not match an array of shape {tuple(shape)}.")
  used: set[str] = set()
  spec: list[MeshAxes] = []
  for dim, name in enumerate(logical_axes):
    chosen: tuple[str, ...] = ()
    if name is not None:
      for rule_name, rule_axes in rules:
        if rule_name != name:
          continue
        candidate = tuple(a for a in _as_tuple(rule_axes) if a in mesh.shape)
        if any(a in used for a in candidate):
          continue
        chosen = candidate
        break
    if shape is not None:
      while chosen and shape[dim] % math.prod(mesh.shape[a] for a in chosen):
        logging.log_first_n(logging.INFO, "Axis %r of size %d does not divide over mesh axes %s; "
                            "dropping %r.", 10, name, shape[dim], chosen, chosen[-1])
        chosen = chosen[:-1]
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  return P(*spec)


def _variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  metadata = variable.get_metadata()
  for key in _SHARDING_METADATA_KEYS:
    axes = metadata.get(key)
    if axes is not None and not isinstance(axes, (jax.sharding.Sharding, P)):
      return tuple(axes)
    if isinstance(axes, P):
      return tuple(axes)
  return None


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> dict[str, Any]:
  """NamedShardings for an NNX state (abstract or concrete), as a pure dict laid out like nnx.to_pure_dict."""
  def one(variable: nnx.Variable) -> NamedSharding:
    shape = np.shape(variable.get_value())
    return NamedSharding(mesh, logical_to_mesh_spec(_variable_logical_axes(variable), rules, mesh, shape))

  out: dict[Any, Any] = {}
  for path, variable in nnx.to_flat_state(state):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = one(variable)
  return out


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of a value every device holds in full (scalars, RNG keys, metrics)."""
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (the ``activation_batch`` rule)."""
  for name, axes in rules:
    if name == BATCH_AXIS:
      return tuple(a for a in _as_tuple(axes) if a in mesh.shape)
  return ()


def num_batch_shards(mesh: Mesh, rules: Rules) -> int:
  """How many ways the global batch is split: the product of the batch mesh axes."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
  """Sharding of an ``ndim``-dimensional batch array: dim 0 over the batch axes, the rest replicated."""
  axes = batch_axes(mesh, rules)
  first: MeshAxes = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def check_mesh_axes_used(mesh: Mesh, rules: Rules) -> None:
  """Raises one clear error for a mesh axis with more than one device that no logical-axis rule uses.

  Nothing would be split over such an axis: every array and all the compute would be repeated on each of its
  devices. The usual case is ``context`` > 1, whose sequence (context) parallelism for GLA is not implemented.
  """
  used = {axis for _, axes in rules for axis in _as_tuple(axes)}
  idle = [name for name in mesh.axis_names if mesh.shape[name] > 1 and name not in used]
  if idle:
    raise ValueError(
        f"Mesh axes {idle} (mesh {dict(mesh.shape)}) have more than one device, but no "
        "config.logical_axis_rules entry maps anything to them, so all work would be repeated on each of "
        "their devices. Give those devices to the data/fsdp/tensor axes in --config.mesh (context/sequence "
        "parallelism for GLA is not implemented yet), or add rules that use them.")


def check_global_batch(global_batch: int, mesh: Mesh, rules: Rules) -> None:
  """Raises one clear error when the global batch cannot be split evenly over devices and processes."""
  shards = num_batch_shards(mesh, rules)
  if global_batch <= 0 or global_batch % shards:
    raise ValueError(
        f"Global batch size {global_batch} is not divisible by the {shards} data-parallel devices (mesh "
        f"{dict(mesh.shape)}, batch axes {batch_axes(mesh, rules)}); set --config.input.batch_size to a "
        f"multiple of {shards}.")
  if global_batch % jax.process_count():
    raise ValueError(f"Global batch size {global_batch} is not divisible by the {jax.process_count()} "
                     "processes.")


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), np.asarray(v))
          for k, v in batch.items()}


def shardings_like(tree: Any, sharding: NamedSharding) -> Any:
  """The same sharding for every leaf of `tree`."""
  return jax.tree.map(lambda _: sharding, tree)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """Attaches shardings to a tree of ShapeDtypeStructs (the restore target for orbax)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree,
                      shardings)
