"""The one public GLA entry point: `gla(q, k, v, log_gate, *, impl="auto", chunk_size=None, scale=None)`.

Every implementation (token recurrent, chunked XLA, Pallas GPU, Pallas TPU) sits behind this function and is
tested against `reference.chunked_gla`. Tensors are `[batch, tokens, heads, dim]`, `log_gate <= 0` per key
channel, scale K**-0.5 applied inside, float32 state.

`impl="auto"` picks, for the default backend and the shape:
- a Pallas kernel module registered in `_KERNELS` for this platform whose `is_supported(q_shape, v_shape,
  dtype)` holds and where the kernel was measured to beat the XLA reference (`_worthwhile`, with the
  module's own `auto_worthwhile(q_shape, v_shape, dtype)` where it has one; see
  `pallas_kernels/gla/NOTES.md` for the numbers);
- otherwise `reference.chunked_gla`, which runs everywhere and is differentiated by XLA.

A `gate.LowRankGate` in place of the log gate (fla's low-rank gate, unformed) is formed by the kernel module's
`gla_low_rank_gate` where the module has one and supports the shape, else evaluated in XLA first.

A kernel module that fails to import (e.g. a backend missing from this jaxlib) is skipped by `auto` and
reported with its import error when asked for by name.

Sharding: with a mesh active, the kernel call runs under `jax.shard_map`, each device on its own batch/head
shard (`pallas_kernels.partition`: which mesh axes, and why; GLA is independent across batch and heads, the
token axis stays whole).
"""
from __future__ import annotations

import enum
import importlib
import inspect
from types import ModuleType

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.gla import reference
from pallas_kernels.gla.gate import LowRankGate, low_rank_log_gate
from pallas_kernels.partition import kernel_partition, shard_kernel

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

# Shortest sequence for which `auto` takes a Pallas kernel over the XLA reference (measured; see NOTES.md).
_MIN_TOKENS: dict[GlaImpl, int] = {GlaImpl.PALLAS_GPU: 1, GlaImpl.PALLAS_TPU: 1}


def _load_kernel(impl: GlaImpl) -> tuple[ModuleType | None, Exception | None]:
  try:
    return importlib.import_module(_KERNELS[impl][0]), None
  except ImportError as e:  # Kernel not present or its backend missing in this jaxlib.
    return None, e


def _parse_impl(impl: str | GlaImpl) -> GlaImpl:
  try:
    return GlaImpl(impl)
  except ValueError:
    raise ValueError(f"unknown GLA impl {impl!r}; choose one of {[i.value for i in GlaImpl]}") from None


def _worthwhile(impl: GlaImpl, module: ModuleType, q_shape: tuple[int, ...], v_shape: tuple[int, ...],
                dtype) -> bool:
  """Long enough for the kernel to pay, and not a case its module leaves to explicit requests."""
  if q_shape[1] < _MIN_TOKENS.get(impl, 1):
    return False
  auto_ok = getattr(module, "auto_worthwhile", None)  # a module's own "supported, but not for auto" cases
  return auto_ok is None or auto_ok(q_shape, v_shape, dtype)


def resolve_impl(impl: str | GlaImpl, q_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype,
                 platform: str | None = None) -> GlaImpl:
  """Maps `impl` (possibly "auto") to a concrete implementation for this platform and shape."""
  impl = _parse_impl(impl)
  if impl != GlaImpl.AUTO:
    return impl
  platform = platform or jax.default_backend()
  for kernel_impl, (_, kernel_platform) in _KERNELS.items():
    if kernel_platform != platform:
      continue
    module, _ = _load_kernel(kernel_impl)
    if module is None or not module.is_supported(q_shape, v_shape, dtype):
      continue
    if _worthwhile(kernel_impl, module, q_shape, v_shape, dtype):
      return kernel_impl
  return GlaImpl.CHUNKED


def _gate_specs(spec: P, gate: LowRankGate) -> LowRankGate:
  """shard_map specs of a LowRankGate's arrays from q's [batch, tokens, heads, dim] spec.

  x follows q's batch split; W_up's columns and b_up are heads-leading ((h d) layout), so a head split of q
  is a contiguous column split of them; W_down is whole on every device (its gradient is summed by the
  shard_map's transpose)."""
  return LowRankGate(x=P(spec[0], None, None), w_down=P(), w_up=P(None, spec[2]), b_up=P(spec[2]),
                     normalizer=gate.normalizer, matmul_dtype=gate.matmul_dtype)


def _call_kernel(module: ModuleType, q, k, v, log_gate, *, chunk_size, scale, interpret):
  kwargs = dict(chunk_size=chunk_size, scale=scale)
  fused_gate = isinstance(log_gate, LowRankGate)
  entry = module.gla_low_rank_gate if fused_gate else module.gla
  if interpret is not None and "interpret" in inspect.signature(entry).parameters:
    kwargs["interpret"] = interpret
  kernel = lambda q, k, v, g: entry(q, k, v, g, **kwargs)
  partition = kernel_partition(q)
  if partition is None:
    return kernel(q, k, v, log_gate)
  mesh, spec = partition
  gate_spec = _gate_specs(spec, log_gate) if fused_gate else spec
  return shard_kernel(kernel, mesh, spec, (spec, spec, spec, gate_spec), q, k, v, log_gate)


def gla(q: Array, k: Array, v: Array, log_gate: Array | LowRankGate, *, impl: str | GlaImpl = GlaImpl.AUTO,
        chunk_size: int | None = None, scale: float | None = None, interpret: bool | None = None) -> Array:
  """Gated linear attention, causal over the token axis. Returns o with v's shape and dtype.

  `log_gate` is the [batch, tokens, heads, K] log forget gate, or a `gate.LowRankGate` (fla's low-rank gate
  logsigmoid(x W_down W_up + b) / normalizer, still to be formed): a kernel module with a
  `gla_low_rank_gate` entry that supports the shape forms it in its own kernels; everywhere else it is
  evaluated by `gate.low_rank_log_gate` first. `interpret=True` runs a Pallas kernel's bodies through the
  Pallas interpreter (CPU tests of `impl="pallas_gpu"` or `"pallas_tpu"`); None leaves each kernel module's
  default.
  """
  # The kernels run on q, k, v promoted to one dtype; decide on that dtype (bf16 q with fp32 v runs in fp32).
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  concrete = resolve_impl(impl, q.shape, v.shape, dtype)
  module, error = _load_kernel(concrete) if concrete in _KERNELS else (None, None)
  if isinstance(log_gate, LowRankGate):
    log_gate.check(q.shape)
    fused = module is not None and getattr(module, "low_rank_gate_supported", None) is not None
    if not (fused and module.low_rank_gate_supported(log_gate, q.shape, chunk_size)):
      log_gate = low_rank_log_gate(log_gate, q.shape[2])
  if concrete == GlaImpl.RECURRENT:
    return reference.recurrent_gla(q, k, v, log_gate, scale=scale)
  if concrete == GlaImpl.CHUNKED:
    return reference.chunked_gla(q, k, v, log_gate, scale=scale,
                                 chunk_size=chunk_size or reference.DEFAULT_CHUNK_SIZE)
  if module is None:
    raise ValueError(f"GLA impl {concrete.value!r} is not available here: {error}")
  if not module.is_supported(q.shape, v.shape, dtype):
    raise ValueError(f"GLA impl {concrete.value!r} does not support q{q.shape} v{v.shape} {dtype}; "
                     "use impl='auto' or 'chunked'")
  return _call_kernel(module, q, k, v, log_gate, chunk_size=chunk_size, scale=scale, interpret=interpret)
