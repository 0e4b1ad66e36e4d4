"""Running a Pallas kernel on a device mesh: per-device shards under `jax.shard_map`, for every kernel family.

A Pallas kernel is one opaque custom call, so XLA's partitioner would all-gather its inputs. The kernels here
act independently per image (batch) and, for GLA, per head, so when a mesh is active (`jax.set_mesh`) and
those dimensions can be split over mesh axes, the call is wrapped in `jax.shard_map` and every device runs the
kernel on its own shard; the token axis stays whole. Which mesh axes: for Explicit-typed axes the input's own
sharding; for Auto axes the conventional names in `BATCH_MESH_AXES` / `HEAD_MESH_AXES` (dig_jax.sharding uses
"data"/"fsdp" for the batch and "tensor" for heads), keeping only axes whose sizes divide the dimension. Axes
that are already manual (a call inside the user's own shard_map) are left alone; such a shard_map needs
`check_vma=False`, because Pallas outputs carry no varying-axes type.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.sharding import AxisType, PartitionSpec as P

BATCH_MESH_AXES = ("data", "fsdp", "batch", "replica", "dp")
HEAD_MESH_AXES = ("tensor", "model", "heads", "tp", "mp")


def _axes_dividing(mesh, names, dim: int) -> tuple[str, ...]:
  """Mesh axes (in mesh order) among `names` with size > 1 whose running product divides `dim`."""
  chosen, product = [], 1
  for name in mesh.axis_names:
    size = mesh.shape[name]
    if name in names and size > 1 and dim % (product * size) == 0:
      chosen.append(name)
      product *= size
  return tuple(chosen)


def spec_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def kernel_partition(x: jax.Array, head_dim: int | None = 2) -> tuple[Any, P] | None:
  """(mesh, PartitionSpec over x's dims) splitting dim 0 (batch) and `head_dim` (None: no head dim) for a
  shard_map around a kernel, or None where there is no mesh or nothing to split."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return None
  explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}
  # Axes already manual (we are inside someone's shard_map) are not ours to split again.
  free = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual}
  own = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim if explicit else ()

  def axes(dim: int, names: tuple[str, ...]) -> tuple[str, ...]:
    chosen = _axes_dividing(mesh, tuple(a for a in names if a in free), x.shape[dim])
    if explicit:  # Explicit axes: follow the input's own sharding on this dim.
      chosen = tuple(a for a in chosen if a not in explicit) + tuple(
          a for a in spec_axes(own[dim]) if a in explicit)
    return chosen

  split = {0: axes(0, BATCH_MESH_AXES)}
  if head_dim is not None:
    split[head_dim] = axes(head_dim, HEAD_MESH_AXES)
  if not any(split.values()):
    return None
  return mesh, P(*(split.get(d) or None for d in range(x.ndim)))


def shard_kernel(kernel: Callable[..., Any], mesh, spec: P, in_specs, *args):
  """`kernel(*args)` under `jax.shard_map` with output spec `spec` (from `kernel_partition`). Inside a partly
  manual mesh only the axes `spec` names become manual; otherwise all of them (the others unmentioned)."""
  manual = any(t == AxisType.Manual for t in mesh.axis_types)
  axis_names = frozenset(a for entry in spec for a in spec_axes(entry)) if manual else frozenset()
  return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=spec, axis_names=axis_names,
                       check_vma=False)(*args)
