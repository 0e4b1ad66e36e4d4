"""What DiG and DiT share: the stem (patchify, sin-cos table, t/y embedders), the final layer and CFG.

Subclasses build `self.blocks` and implement `_run_blocks(tokens, c) -> tokens`, which must return tokens in
raster order. With `model.stack_blocks` (the default) `self.blocks` is one block module whose parameters are
stacked on a leading "layers" axis (paths blocks/..., each leaf [depth, ...]; `create_stacked_blocks`), run
by `run_stacked_blocks` with `jax.lax.scan` (fully unrolled by default, `model.scan_unroll`): the optimizer,
EMA and gradient bookkeeping see ~15 large leaves instead of ~15 per block (maxtext's `scan_layers`), which
measured 1.2-1.3x faster training steps for both DiG-S/2 and DiT-S/2 at 256 px on an H100
(benchmarks/NOTES.md), though ~30 % slower for the tiny demo model on a 2-core CPU (configs/demo.py).
Otherwise it is an `nnx.List` of blocks (paths blocks/i/...). The arithmetic is the same either way;
`stack_block_params` / `unstack_block_params` move parameters between the two layouts.

Layout is JAX's NHWC: x [N, H, W, C] -> out [N, H, W, 2C] (learn_sigma: eps first, then the variance value)
or [N, H, W, C]. The official code is NCHW; the converter transposes.

Top-level parameter paths: x_embedder/proj/{kernel [p*p*C, D], bias [D]}, pos_embed [1, T, D] (SinCosPosEmbed,
not an nnx.Param), t_embedder/fc1/{kernel [256, D], bias}, t_embedder/fc2/{kernel [D, D], bias},
y_embedder/embedding_table [num_classes + 1, D], final_layer/adaln_modulation/{kernel [D, 2D], bias [2D]},
final_layer/linear/{kernel [D, p*p*C_out], bias} (output features ordered (p_row, p_col, channel)).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dig_jax.models import partitioning as pt
from dig_jax.models.configs import input_hw
from dig_jax.models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d_table, unpatchify
from dig_jax.models.layers import FinalLayer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class DiffusionBackbone(nnx.Module):
  """Base class: stem + final layer + `forward_with_cfg`; the blocks come from the subclass."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.config = ml_collections.FrozenConfigDict(config)
    cfg = self.config
    self.dtype = DTYPES[cfg.dtype]
    self.image_hw = input_hw(cfg.input_size)
    self.patch_size = cfg.patch_size
    self.grid = (self.image_hw[0] // cfg.patch_size, self.image_hw[1] // cfg.patch_size)
    self.in_channels = cfg.in_channels
    self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
    d = cfg.hidden_size
    self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d, rngs=rngs, dtype=self.dtype)
    table = sincos_2d_table(d, *self.grid)[None].astype("float32")
    self.pos_embed = pt.make_variable(jnp.asarray(table), (None, None, pt.EMBED), pt.SinCosPosEmbed)
    self.t_embedder = TimestepEmbedder(d, rngs=rngs, dtype=self.dtype)
    self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob, rngs=rngs, dtype=self.dtype)
    self.final_layer = FinalLayer(d, cfg.patch_size, self.out_channels, rngs=rngs, dtype=self.dtype)

  def _run_blocks(self, tokens: jax.Array, c: jax.Array) -> jax.Array:
    raise NotImplementedError

  def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
    expected = (*self.image_hw, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(f"x must be NHWC [N, {expected[0]}, {expected[1]}, {expected[2]}] (the model's "
                       f"input_size / in_channels); got {tuple(x.shape)}")
    if jnp.shape(t) != (x.shape[0],) or jnp.shape(y) != (x.shape[0],):
      raise ValueError(f"t and y must have shape [N] = [{x.shape[0]}]; got {jnp.shape(t)} and {jnp.shape(y)}")

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *,
               label_drop_rng: jax.Array | None = None) -> jax.Array:
    """x [N, H, W, C], t [N] (int or float), y [N] int labels -> [N, H, W, out_channels] float32.

    Labels are dropped to the null class with probability class_dropout_prob iff `label_drop_rng` is given.
    """
    self._check_inputs(x, t, y)
    tokens = self.x_embedder(x) + self.pos_embed.get_value().astype(self.dtype)
    c = self.t_embedder(t) + self.y_embedder(y, label_drop_rng)
    tokens = self._run_blocks(tokens, c)
    out = self.final_layer(tokens, c)
    return unpatchify(out, self.grid, self.patch_size, self.out_channels).astype(jnp.float32)

  def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale: float | jax.Array
                       ) -> jax.Array:
    """DiT's batched classifier-free guidance.

    x [2N, ...]: only the first half is used (copied to both halves, as the official code does); y's second
    half is expected to be the null class. Guidance eps_u + s * (eps_c - eps_u) is applied to the first
    `cfg_channels` output channels and written to both halves; the other channels are the model output.
    """
    if x.shape[0] % 2:
      raise ValueError(f"forward_with_cfg needs an even batch [cond | uncond]; got {x.shape[0]}")
    half = x[: x.shape[0] // 2]
    out = self(jnp.concatenate([half, half], axis=0), t, y)
    k = self.config.cfg_channels
    eps, rest = out[..., :k], out[..., k:]
    cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
    guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)


def maybe_remat(fn, remat: str, functional: bool = False):
  """`nnx.remat(fn)` (`jax.checkpoint` if `functional`) when remat == "block" (recompute each block's
  activations in the backward pass)."""
  if remat == "block":
    return jax.checkpoint(fn) if functional else nnx.remat(fn)
  if remat != "none":
    raise ValueError(f"unknown remat {remat!r}; use 'none' or 'block'")
  return fn


BlockStep = Callable[[nnx.Module, jax.Array, jax.Array], jax.Array]


def create_blocks(make_block: Callable[[nnx.Rngs], nnx.Module], depth: int, stacked: bool, rngs: nnx.Rngs
                  ) -> nnx.Module:
  """`depth` blocks: stacked (`create_stacked_blocks`) or an `nnx.List` of independent blocks."""
  if stacked:
    return create_stacked_blocks(make_block, depth, rngs)
  return nnx.List([make_block(rngs) for _ in range(depth)])


def create_stacked_blocks(make_block: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs
                          ) -> nnx.Module:
  """`depth` independently initialised blocks as one module, every parameter with a leading "layers" axis."""
  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: pt.LAYERS})
  def create(block_rngs: nnx.Rngs) -> nnx.Module:
    return make_block(block_rngs)
  return create(rngs)


def run_stacked_blocks(blocks: nnx.Module, tokens: jax.Array, c: jax.Array, steps: Sequence[BlockStep], *,
                       remat: str, unroll: int) -> jax.Array:
  """Runs stacked blocks with `jax.lax.scan` over groups of P = len(steps) consecutive blocks.

  Block g * P + k runs `steps[k](block, x, c)`, so blocks that differ by their position inside the repeating
  unit (DiG's scan orders) get their own step; a depth that is not a multiple of P ends with a shorter group.
  unroll=0 unrolls every group (straight-line code, the fastest measured: benchmarks/NOTES.md); unroll=N >= 1
  keeps a loop that runs N groups per iteration (compiles once per group, not once per block). With
  remat="block" each block's activations are recomputed in the backward pass, as in the unstacked model.
  """
  graphdef, state = nnx.split(blocks)
  depth = jax.tree.leaves(state)[0].shape[0]
  period = len(steps)
  groups, tail = divmod(depth, period)

  def step_fn(step: BlockStep) -> Callable[[nnx.State, jax.Array], jax.Array]:
    def run(block_state: nnx.State, x: jax.Array) -> jax.Array:
      return step(nnx.merge(graphdef, block_state), x, c)
    return maybe_remat(run, remat, functional=True)

  step_fns = [step_fn(step) for step in steps]

  def scan(x: jax.Array, start: int, length: int, size: int) -> jax.Array:
    """`length` groups of `size` blocks from block `start` on."""
    part = jax.tree.map(lambda a: a[start:start + length * size].reshape(length, size, *a.shape[1:]), state)

    def group(x: jax.Array, group_state: nnx.State) -> tuple[jax.Array, None]:
      for k, run in enumerate(step_fns[:size]):
        x = run(jax.tree.map(lambda a, k=k: a[k], group_state), x)
      return x, None
    return jax.lax.scan(group, x, part, unroll=length if unroll == 0 else min(unroll, length))[0]

  if groups:
    tokens = scan(tokens, 0, groups, period)
  if tail:
    tokens = scan(tokens, groups * period, 1, tail)
  return tokens


def stack_block_params(tree: Mapping[Any, Any], depth: int) -> dict[Any, Any]:
  """Pure dict, per-block layout (blocks/{0..depth-1}/...) -> stacked layout (blocks/..., [depth, ...]).

  Other entries are passed through. Works on NumPy and JAX leaves (stacked with jnp).
  """
  blocks = tree["blocks"]
  keys = sorted(blocks, key=int)
  if [int(k) for k in keys] != list(range(depth)):
    raise ValueError(f"expected blocks 0..{depth - 1} to stack; got {keys}")
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(blocks[k] for k in keys))
  return {**tree, "blocks": stacked}


def unstack_block_params(tree: Mapping[Any, Any]) -> dict[Any, Any]:
  """Inverse of `stack_block_params`: blocks/... [depth, ...] -> blocks/{i}/... (int keys, as nnx.List)."""
  leaves = jax.tree.leaves(tree["blocks"])
  depth = leaves[0].shape[0]
  if any(leaf.shape[:1] != (depth,) for leaf in leaves):
    raise ValueError("stacked block parameters must share the leading (layers) dimension")
  blocks = {i: jax.tree.map(lambda a, i=i: a[i], tree["blocks"]) for i in range(depth)}
  return {**tree, "blocks": blocks}
