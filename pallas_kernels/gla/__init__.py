"""Gated linear attention: pure-JAX references, Pallas kernels and one dispatcher (`gla`)."""
from pallas_kernels.gla.gate import LowRankGate
from pallas_kernels.gla.ops import GlaImpl, gla, resolve_impl
from pallas_kernels.gla.reference import chunked_gla, recurrent_gla

__all__ = ["GlaImpl", "LowRankGate", "gla", "resolve_impl", "chunked_gla", "recurrent_gla"]
