"""The SREM kernel's entry point on a device mesh: `conv_reorient(x, kernel, bias, *, grid, reorient)`.

With a mesh active the kernel runs under `jax.shard_map`, each device on its own images
(`pallas_kernels.partition`): the conv and the reorientation act within an image, so only the token axis must
stay whole. The kernel and the bias are replicated, and shard_map's transpose sums their gradients over the
batch shards.
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels.partition import kernel_partition, shard_kernel
from pallas_kernels.srem import gpu
from pallas_kernels.srem.reference import Grid


def conv_reorient(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, grid: Grid, reorient: str,
                  interpret: bool = False) -> jax.Array:
  """`gpu.conv_reorient` (x [N, T, D], kernel [k, k, D], bias [D]), split over the mesh's batch axes if
  any."""
  call = functools.partial(gpu.conv_reorient, grid=grid, reorient=reorient, interpret=interpret)
  partition = kernel_partition(x, head_dim=None)
  if partition is None:
    return call(x, kernel, bias)
  mesh, spec = partition
  return shard_kernel(call, mesh, spec, (spec, P(), P()), x, kernel, bias)
