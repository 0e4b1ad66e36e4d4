"""Recomputed states for short sequences: the GPU GLA op in 3 Pallas calls per forward+backward instead of 5.

Why. At DiG-S/2's 256 px training shape (B=32, T=256, H=6, K=32, V=64: 4 chunks of 64) the op's five Triton
calls (forward: the state pass + the output kernel; backward: the reverse state pass + the dv and dq/dk/dG
kernels) are latency- and launch-bound: ~0.07 ms forward, ~0.13 ms forward+backward on an H100, about 10x
the HBM floor (NOTES.md). The two sequential state passes only hand each chunk-parallel program its chunk's
state h_n (D_n for the backward) through HBM; with few chunks a program can form it from the chunks before
(after) its own.

What. With `KernelConfig.states="recompute"` no state pass runs and no state goes to HBM: forward 1 call (was
2; 1 without a gradient too), backward 2 (was 3), and the custom VJP saves q, k, v and G only. The output,
dv and dq/dk/dG kernels (`gpu_kernels.out_kernel`, `dv_kernel`, `dqk_kernel`, grid (b, h, n, tile)) are the
stored-state ones; only their state source differs: `RecomputedStates` in place of
`gpu_kernels.StoredStates`. It takes three whole-sequence blocks of this (batch, head) (`state_operands`:
k, G, v for h_n; q, G, dO for D_n; K columns at the grid's K tile or whole, V columns at its V tile or
whole, as the state block the kernel would read) and runs F1 over the chunks j < n (h_n, `state_update`)
or B1 over the chunks j > n (D_n, `dstate_update`) for the K rows and V columns that the kernel asks for,
in fp32 (stored states are bf16 for bf16 inputs). K rows and V columns of a state are independent, so a
kernel's K-tile and V-tile loops recompute only their own block.

Cost. Program n runs n (forward) or NT-1-n (backward) chunk updates, each a (K x C) @ (C x V) product of
its tile plus the loads of a chunk of k, v, G (q, dO, G): per (batch, head, tile) about NT^2 / 2 updates
against a state pass's NT, and the dq/dk/dG kernel forms both h_n and D_n (NT-1 updates per program). The
mode is correct at any chunk count but meant for a few (`gpu.RECOMPUTE_MAX_CHUNKS`); it is not timed yet.
`KernelConfig.recompute_loop`: "masked" unrolls the NT-1 chunks that can contribute and keeps (`jnp.where`)
the updates of this program's chunks: NT-1 updates per program, all loads static (Triton can issue them
at once); "dynamic" runs a `fori_loop` with the traced count (n, or NT-1-n; an scf.for with a dynamic bound
in Triton): only the updates it needs, one after another. Which is faster is for the GPU to say.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gla.gpu_kernels import KernelConfig, chunk_rows, dstate_update, state_update

Array = jax.Array
STATE_MODES = ("stored", "recompute")
RECOMPUTE_LOOPS = ("masked", "dynamic")


class StateInputs(NamedTuple):
  """What recomputed states are formed from, passed where a state pass's states would be (`gpu._grads`,
  `gpu._outputs`): (k, G, v) for h_n (`forward_inputs`), (q, G, dO) for D_n (`backward_inputs`)."""
  keys: Array     # k or q: [B, T, H, K]
  g: Array        # G, the chunk-local cumsum of the log gate: [B, T, H, K] fp32
  values: Array   # v or dO: [B, T, H, V]
  reverse: bool   # D_n (B1, over the later chunks) rather than h_n (F1, over the earlier ones)


def forward_inputs(k: Array, v: Array, g: Array) -> StateInputs:
  return StateInputs(k, g, v, reverse=False)


def backward_inputs(q: Array, g: Array, do: Array) -> StateInputs:
  return StateInputs(q, g, do, reverse=True)


def _width(index, full: int) -> int:
  return full if isinstance(index, slice) else index.size


@dataclasses.dataclass(frozen=True)
class RecomputedStates:
  """A chunk-parallel kernel's state source (see `gpu_kernels.StoredStates`) that forms h_n, or D_n with
  `reverse`, for the program's chunk n = program_id(2) from `state_operands`' three whole-sequence refs."""
  chunk: int
  reverse: bool
  loop: str
  scale: float
  mm_dtype: Any
  prec: Any
  num_refs: int = 3

  def load(self, refs, rows=slice(None), cols=slice(None)) -> Array:
    """The K rows `rows` (columns of the keys and G blocks) and V columns `cols` (of the values block) of
    the state, fp32."""
    keys_ref, g_ref, values_ref = refs
    c = self.chunk
    num_chunks = g_ref.shape[0] // c
    n = pl.program_id(2)

    def update(j, s):
      r = chunk_rows(j, c)
      a, g, b = keys_ref[r, rows], g_ref[r, rows], values_ref[r, cols]
      g_last = g_ref[j * c + c - 1, rows]
      if self.reverse:
        return dstate_update(s, a, g, g_last, b, self.scale, self.mm_dtype, self.prec)
      return state_update(s, a, b, g, g_last, self.mm_dtype, self.prec)

    s = jnp.zeros((_width(rows, g_ref.shape[-1]), _width(cols, values_ref.shape[-1])), jnp.float32)
    if self.loop == "masked":
      # h_n: chunks 0 .. n-1 in order; D_n: chunks NT-1 .. n+1 in reverse (the last / first never counts).
      for j in (range(num_chunks - 1, 0, -1) if self.reverse else range(num_chunks - 1)):
        s = jnp.where(j > n if self.reverse else j < n, update(j, s), s)
      return s
    if self.reverse:
      return jax.lax.fori_loop(0, num_chunks - 1 - n, lambda i, s: update(num_chunks - 1 - i, s), s)
    return jax.lax.fori_loop(0, n, update, s)


def state_operands(inputs: StateInputs, block: tuple[int, int], tiled: str, cfg: KernelConfig, mm_dtype,
                   prec) -> tuple[list, list, RecomputedStates]:
  """Operands, BlockSpecs and state source that let a chunk-parallel kernel (grid (b, h, n, tile)) form
  the `block` of chunk n's state that `gpu._state_operands` would hand it from stored states: K rows at
  the grid's K tile (`tiled="k"`, block[0] of them) or all K, V columns at its V tile ("v") or all V."""
  tokens = inputs.g.shape[1]

  def spec(width: int, on_tile: bool):
    return pl.BlockSpec((None, tokens, None, width), lambda i, j, n, t: (i, 0, j, t if on_tile else 0))
  keys_spec = spec(block[0], tiled == "k")
  source = RecomputedStates(cfg.chunk_size, inputs.reverse, cfg.recompute_loop, cfg.scale, mm_dtype, prec)
  return [inputs.keys, inputs.g, inputs.values], [keys_spec, keys_spec, spec(block[1], tiled == "v")], source


def check_config(config: KernelConfig) -> None:
  """ValueErrors for unknown `states` / `recompute_loop` values and for settings the recompute mode replaces
  (the fused forward, segmented state passes, the one-kernel gradient: they all read or write stored
  states)."""
  if config.states not in STATE_MODES:
    raise ValueError(f"KernelConfig.states must be one of {STATE_MODES}; got {config.states!r}")
  if config.recompute_loop not in RECOMPUTE_LOOPS:
    raise ValueError(f"KernelConfig.recompute_loop must be one of {RECOMPUTE_LOOPS}; "
                     f"got {config.recompute_loop!r}")
  conflicts = config.fused or config.state_segments != 1 or config.grad_version != 2
  if config.states == "recompute" and conflicts:
    raise ValueError("KernelConfig.states='recompute' runs no state pass: it needs fused=False, "
                     f"state_segments=1 and grad_version=2; got fused={config.fused}, "
                     f"state_segments={config.state_segments}, grad_version={config.grad_version}")
