"""The one public GLA entry point: `gla(q, k, v, log_gate, *, impl="auto", chunk_size=None, scale=None)`.

Every implementation (token recurrent, chunked XLA, Pallas GPU, Pallas TPU) sits behind this function and is
tested against `reference.chunked_gla`. `impl="auto"` picks the fastest implementation that supports the
platform and shape, and falls back to the chunked reference otherwise, so models never need to know which
kernels exist. Tensors are `[batch, tokens, heads, dim]`, `log_gate <= 0` per key channel, scale K**-0.5 applied
inside, float32 state.

Kernel modules plug in through `_KERNELS`: each names a module exposing
`gla(q, k, v, log_gate, *, chunk_size, scale) -> o` (differentiable, i.e. a `jax.custom_vjp`) and
`is_supported(q_shape, v_shape, dtype) -> bool`. A kernel module that fails to import (e.g. a backend missing from
this jaxlib) is treated as unavailable by `auto` and reported with its import error when asked for by name.
"""
from __future__ import annotations

import enum
import importlib
from types import ModuleType

import jax

from pallas_kernels.gla import reference

Array = jax.Array


class GlaImpl(str, enum.Enum):
  AUTO = "auto"
  RECURRENT = "recurrent"
  CHUNKED = "chunked"
  PALLAS_GPU = "pallas_gpu"
  PALLAS_TPU = "pallas_tpu"


# impl -> (module, platform it runs on).
_KERNELS: dict[GlaImpl, tuple[str, str]] = {
    GlaImpl.PALLAS_GPU: ("pallas_kernels.gla.gpu", "gpu"),
    GlaImpl.PALLAS_TPU: ("pallas_kernels.gla.tpu", "tpu"),
}


def _load_kernel(impl: GlaImpl) -> tuple[ModuleType | None, Exception | None]:
  try:
    return importlib.import_module(_KERNELS[impl][0]), None
  except ImportError as e:  # Kernel not present or its backend missing in this jaxlib.
    return None, e


def resolve_impl(impl: str | GlaImpl, q_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype,
                 platform: str | None = None) -> GlaImpl:
  """Maps `impl` (possibly "auto") to a concrete implementation for this platform and shape."""
  try:
    impl = GlaImpl(impl)
  except ValueError:
    raise ValueError(f"unknown GLA impl {impl!r}; choose one of {[i.value for i in GlaImpl]}") from None
  if impl != GlaImpl.AUTO:
    return impl
  platform = platform or jax.default_backend()
  for kernel_impl, (_, kernel_platform) in _KERNELS.items():
    if kernel_platform != platform:
      continue
    module, _ = _load_kernel(kernel_impl)
    if module is not None and module.is_supported(q_shape, v_shape, dtype):
      return kernel_impl
  return GlaImpl.CHUNKED


def gla(q: Array, k: Array, v: Array, log_gate: Array, *, impl: str | GlaImpl = GlaImpl.AUTO,
        chunk_size: int | None = None, scale: float | None = None) -> Array:
  """Gated linear attention, causal over the token axis. Returns o with v's shape and dtype."""
  concrete = resolve_impl(impl, q.shape, v.shape, q.dtype)
  if concrete == GlaImpl.RECURRENT:
    return reference.recurrent_gla(q, k, v, log_gate, scale=scale)
  if concrete == GlaImpl.CHUNKED:
    return reference.chunked_gla(q, k, v, log_gate, scale=scale,
                                 chunk_size=chunk_size or reference.DEFAULT_CHUNK_SIZE)
  module, error = _load_kernel(concrete)
  if module is None:
    raise ValueError(f"GLA impl {concrete.value!r} is not available here: {error}")
  if not module.is_supported(q.shape, v.shape, q.dtype):
    raise ValueError(f"GLA impl {concrete.value!r} does not support q{q.shape} v{v.shape} {q.dtype}; "
                     "use impl='auto' or 'chunked'")
  return module.gla(q, k, v, log_gate, chunk_size=chunk_size, scale=scale)
