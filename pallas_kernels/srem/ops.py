"""The SREM kernel's entry point on a device mesh: `conv_reorient(x, kernel, bias, *, grid, reorient)`.

A Pallas kernel is one opaque custom call, so XLA's partitioner would all-gather its inputs. When a mesh is
active (`jax.set_mesh`) and the batch can be split over mesh axes, the kernel runs under `jax.shard_map`, each
device on its own images: the conv and the reorientation act within an image, so only the token axis must
stay whole. The batch axes are chosen as for the GLA kernels (`pallas_kernels.gla.ops.kernel_partition`: the
conventional batch-axis names for Auto axes, the input's own sharding for Explicit ones); the kernel and the
bias are replicated, and shard_map's transpose sums their gradients over the batch shards.
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import AxisType, PartitionSpec as P

from pallas_kernels.gla.ops import kernel_partition
from pallas_kernels.srem import gpu
from pallas_kernels.srem.reference import Grid


def conv_reorient(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, grid: Grid, reorient: str,
                  interpret: bool = False) -> jax.Array:
  """`gpu.conv_reorient` (x [N, T, D], kernel [k, k, D], bias [D]), split over the mesh's batch axes if
  any."""
  call = functools.partial(gpu.conv_reorient, grid=grid, reorient=reorient, interpret=interpret)
  partition = kernel_partition(x[:, :, None, :])   # [N, T, 1, D]: batch axes only (one "head")
  if partition is None:
    return call(x, kernel, bias)
  mesh, spec = partition
  manual = any(t == AxisType.Manual for t in mesh.axis_types)
  batch_axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  x_spec = P(spec[0], None, None)
  return jax.shard_map(call, mesh=mesh, in_specs=(x_spec, P(), P()), out_specs=x_spec,
                       axis_names=frozenset(batch_axes) if manual else frozenset(),
                       check_vma=False)(x, kernel, bias)
