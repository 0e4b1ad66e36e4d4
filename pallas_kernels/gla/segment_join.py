"""The join of a segmented state pass, shared by the Triton (`gpu`) and Mosaic GPU (`gpu_mosaic`) kernels.

A state pass split into S segments runs each from a zero state; what each segment receives from the ones
before it (after it, for the backward pass's reverse pass) is formed here in XLA, on [B, S, H, ...] and
[B, NT, H, K] arrays (S small, the loop unrolled), and the kernels that read the states add it as they load
them. The math is in `join`'s docstring; `gpu.SegmentedStates` and `gpu_mosaic.TransposedStates` hold the
parts (K x V states, or transposed V x K ones).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def join(ends: Array, gamma: Array, reverse: bool, k_axis: int) -> tuple[Array, Array]:
  """(carry, decay): the state entering each segment [B, S, H, <state>] and e^(decay from the segment's
  border to chunk n) [B, NT, H, K]; `k_axis` is K's axis in a state, -2 for K x V, -1 for V x K.

  Forward: local[n] holds what chunks a..n-1 of n's segment [a, b) put into h_n; the true h_n adds
  e^(gamma_a + ... + gamma_{n-1}) * H_a, where H_a (the state entering the segment) = ends[s-1] +
  e^(segment s-1's total decay) * H of segment s-1. Backward (`reverse`): local[n] = what chunks n+1..b-1 put
  into D_n; the rest is e^(gamma_{n+1} + ... + gamma_{b-1}) * D_{b-1}, carried from the right likewise.
  """
  b, nt, heads, dim_k = gamma.shape
  segments = ends.shape[1]
  gam = gamma.reshape(b, segments, nt // segments, heads, dim_k)
  if reverse:
    decay_in = jnp.flip(jnp.cumsum(jnp.flip(gam, 2), axis=2), 2) - gam  # sum over the later chunks
    order = range(segments - 2, -1, -1)
  else:
    decay_in = jnp.cumsum(gam, axis=2) - gam                             # sum over the earlier chunks
    order = range(1, segments)
  total = jnp.expand_dims(jnp.exp(jnp.sum(gam, axis=2)), -1 if k_axis == -2 else -2)  # [B, S, H, K|1, 1|K]
  carries = [None] * segments
  carries[segments - 1 if reverse else 0] = jnp.zeros_like(ends[:, 0])   # nothing flows into the first one
  for s in order:
    src = s + 1 if reverse else s - 1
    carries[s] = carries[src] * total[:, src] + ends[:, src]
  return jnp.stack(carries, axis=1), jnp.exp(decay_in).reshape(b, nt, heads, dim_k)
