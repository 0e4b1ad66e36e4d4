"""Images from a trained DiG/DiT: the sampler the train loop uses for grids, and a CLI for checkpoints.

CLI (restores the EMA parameters of a training workdir; reads its config.json):
  python -m dig_jax.sample --workdir=runs/demo [--step=N] --num_samples=64 --cfg_scale=1.5 --num_steps=250 \\
      --sampler=ddpm|ddim|dpm --seed=0 [--labels=1,2,3] [--batch_size=64] [--out=DIR]
It writes ``DIR/grid.png`` (the first `--grid_size` samples) and ``DIR/samples.npz``: uint8 NHWC samples in
[0, 255] under ``arr_0`` (the ADM/DiT FID format; class labels under ``labels``). DIR defaults to
``<workdir>/samples/<sampler><steps>_cfg<scale>_step<step>``.

Sampling follows DiT's ``sample.py``/``sample_ddp.py``: noise z ~ N(0, I); with cfg_scale != 1 the batch
is [z, z] with labels [y, null] through ``model.forward_with_cfg`` and the first half is kept; DDPM runs on a
respaced diffusion (``create_diffusion(str(num_steps))``) with ``clip_denoised=False`` by default, DDIM on the
same respacing, DPM-Solver++(2M) on the original schedule; samples map to uint8 by
``clip(127.5 x + 128, 0, 255)`` truncated, as ``sample_ddp.py`` does. Without ``--labels`` the CLI draws
labels uniformly (the FID protocol); the training grid uses classes 0, 1, 2, ...

Latent-space configs (``config.latent.vae`` set) need the SD-VAE decoder, which is not ported yet: `decode`
is the seam and raises a clear NotImplementedError for them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from dig_jax import checkpointing, diffusion as diffusion_lib, models, sharding
from dig_jax.cli_errors import exit_on_input_error

SAMPLERS = ("ddpm", "ddim", "dpm")


def require_pixel_space(config: ml_collections.ConfigDict) -> None:
  """Raises NotImplementedError for latent-space configs until the VAE lands (the seam for encode/decode)."""
  vae = config.get("latent", {}).get("vae") if hasattr(config, "get") else None
  if vae:
    raise NotImplementedError(
        f"config.latent.vae={vae!r}: latent-space training and sampling need the Stable Diffusion VAE, which "
        "dig-jax does not include yet (planned under dig_jax/vae). Use a pixel-space config such as "
        "configs/demo.py, or a config without latent.vae.")


def decode(samples: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """Model-space samples -> images in [-1, 1]: identity in pixel space; for latents the VAE (pending)."""
  require_pixel_space(config)
  return samples


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255] as DiT's sample_ddp.py (127.5 x + 128, clipped, truncated)."""
  return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, num_columns: int | None = None, padding: int = 2) -> np.ndarray:
  """[N, H, W, C] uint8 -> one [rows*(H+p)+p, cols*(W+p)+p, C] grid image (black padding)."""
  n, h, w, c = images.shape
  cols = num_columns or max(1, math.ceil(math.sqrt(n)))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
  for i, image in enumerate(images):
    top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
    grid[top:top + h, left:left + w] = image
  return grid


def save_png(image: np.ndarray, path: str | os.PathLike[str]) -> None:
  """Writes an [H, W, C] uint8 image (C = 1 or 3) as PNG, creating the folder."""
  os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def parse_labels(labels: str | Sequence[int] | None, count: int, num_classes: int, *,
                 rng: np.random.Generator | None = None) -> np.ndarray:
  """`count` int32 labels: a list/"3,1,4" repeated cyclically, or (if empty) 0,1,2,... or uniform if `rng`."""
  if isinstance(labels, str):
    labels = [int(v) for v in labels.replace(" ", "").split(",") if v]
  labels = list(labels or [])
  if labels:
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
      raise ValueError(f"Labels {bad} are outside [0, {num_classes}) for this model.")
    return np.resize(np.asarray(labels, np.int32), count)
  if rng is not None:
    return rng.integers(0, num_classes, size=count).astype(np.int32)
  return (np.arange(count) % num_classes).astype(np.int32)


def _sample(params: Any, model_state: Any, labels: jax.Array, rng: jax.Array, *, graphdef: nnx.GraphDef,
            diffusion: Any, sampler: str, num_steps: int, cfg_scale: float, eta: float, clip_denoised: bool,
            null_class: int, shape: tuple[int, int, int]) -> jax.Array:
  """Pure sampling of one batch; returns model-space x_0 [N, H, W, C] (float32)."""
  model = nnx.merge(graphdef, params, model_state)
  n = labels.shape[0]
  noise_key, loop_key = jax.random.split(rng)
  z = jax.random.normal(noise_key, (n, *shape), jnp.float32)
  if cfg_scale != 1.0:
    z = jnp.concatenate([z, z], axis=0)
    y = jnp.concatenate([labels, jnp.full_like(labels, null_class)], axis=0)
    model_fn = lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale).astype(jnp.float32)
  else:
    model_fn = lambda x, t: model(x, t, labels).astype(jnp.float32)
  if sampler == "ddpm":
    x = diffusion.p_sample_loop(model_fn, z.shape, loop_key, clip_denoised=clip_denoised, noise=z)
  elif sampler == "ddim":
    x = diffusion.ddim_sample_loop(model_fn, z.shape, loop_key, eta=eta, clip_denoised=clip_denoised, noise=z)
  else:
    x = diffusion.dpm_solver_pp_sample_loop(model_fn, z.shape, loop_key, num_steps=num_steps, noise=z,
                                            clip_denoised=clip_denoised)
  return x[:n]


class ImageSampler:
  """A compiled-once sampler: ``sampler(params, model_state, labels, rng) -> uint8 [N, H, W, C]``.

  With `batch_sharding` (a 1-D NamedSharding over the batch axes) a batch whose size divides over it is split
  across devices; otherwise every device computes the whole batch.
  """

  def __init__(self, graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, *, sampler: str,
               num_steps: int, cfg_scale: float, eta: float = 0.0, clip_denoised: bool = False,
               batch_sharding: jax.sharding.NamedSharding | None = None):
    if sampler not in SAMPLERS:
      raise ValueError(f"Unknown sampler {sampler!r}; use one of {SAMPLERS}.")
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    require_pixel_space(config)
    model_config = config.model
    self._config = config
    self._batch_sharding = batch_sharding
    spacing = "" if sampler == "dpm" else str(num_steps)
    diffusion = diffusion_lib.create_diffusion(
        spacing, num_timesteps=int(config.diffusion.num_timesteps),
        noise_schedule=str(config.diffusion.noise_schedule), learn_sigma=bool(model_config.learn_sigma))
    size = model_config.input_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    self._fn = jax.jit(functools.partial(
        _sample, graphdef=graphdef, diffusion=diffusion, sampler=sampler, num_steps=int(num_steps),
        cfg_scale=float(cfg_scale), eta=float(eta), clip_denoised=bool(clip_denoised),
        null_class=int(model_config.num_classes),
        shape=(h, w, int(model_config.in_channels))))

  def __call__(self, params: Any, model_state: Any, labels: np.ndarray, rng: jax.Array) -> np.ndarray:
    labels = np.asarray(labels, np.int32)
    shards = self._batch_sharding.num_devices if self._batch_sharding is not None else 0
    if shards > 1 and len(labels) % shards == 0:
      labels = jax.device_put(labels, self._batch_sharding)
    samples = decode(self._fn(params, model_state, jnp.asarray(labels), rng), self._config)
    return to_uint8(multihost_utils.process_allgather(samples, tiled=True))


def sample_images(graphdef: nnx.GraphDef, params: Any, model_state: Any, config: ml_collections.ConfigDict, *,
                  labels: np.ndarray, rng: jax.Array, sampler: str = "ddpm", num_steps: int = 250,
                  cfg_scale: float = 1.0, eta: float = 0.0, clip_denoised: bool = False,
                  batch_size: int | None = None,
                  batch_sharding: jax.sharding.NamedSharding | None = None) -> np.ndarray:
  """Samples ``len(labels)`` images (uint8 NHWC) in batches of `batch_size`; batch i uses fold_in(rng, i)."""
  run = ImageSampler(graphdef, config, sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale, eta=eta,
                     clip_denoised=clip_denoised, batch_sharding=batch_sharding)
  labels = np.asarray(labels, np.int32)
  batch_size = min(batch_size or len(labels), len(labels))
  chunks = []
  for i, start in enumerate(range(0, len(labels), batch_size)):
    chunk = labels[start:start + batch_size]
    padded = np.resize(chunk, batch_size)  # Same shape for every batch: compiled once.
    chunks.append(run(params, model_state, padded, jax.random.fold_in(rng, i))[:len(chunk)])
  return np.concatenate(chunks, axis=0)


def load_config(workdir: str | os.PathLike[str]) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote to ``workdir/config.json``."""
  path = os.path.join(os.fspath(workdir), "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training workdir (written by "
                            "dig_jax.main).")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  model = config.get("model")
  if isinstance(model, dict) and "stack_blocks" not in model:
    model["stack_blocks"] = False  # written before the field existed: blocks were stored one by one
  return ml_collections.ConfigDict(config)


def abstract_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: sharding.Rules):
  """(graphdef, abstract params, abstract model_state) as pure dicts of sharded ShapeDtypeStructs."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
  graphdef, params, model_state = nnx.split(abstract, nnx.Param, ...)
  out = []
  for state in (params, model_state):
    shardings = sharding.state_shardings(state, mesh, rules)
    out.append(sharding.with_shardings(nnx.to_pure_dict(state), shardings))
  return graphdef, out[0], out[1]


@dataclasses.dataclass
class RestoredModel:
  """What sampling needs from a training workdir; sample under ``jax.set_mesh(mesh)`` and the rules."""
  config: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  ema_params: Any
  model_state: Any
  step: int
  mesh: jax.sharding.Mesh
  rules: sharding.Rules


def load_ema_params(workdir: str | os.PathLike[str], step: int | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> RestoredModel:
  """Restores the EMA parameters (and non-trainable model state) of a training workdir."""
  config = load_config(workdir)
  rules = sharding.logical_axis_rules(config.get("logical_axis_rules"))
  if mesh is None:
    try:
      mesh = sharding.create_mesh(config.mesh)
    except ValueError:  # Trained on another device count: sample data-parallel on what is here.
      mesh = sharding.create_mesh([(name, -1 if i == 0 else 1) for i, (name, _) in enumerate(config.mesh)])
  graphdef, params, model_state = abstract_model(config, mesh, rules)
  target = {"ema_params": params}
  if jax.tree.leaves(model_state):
    target["model_state"] = model_state
  restored, step = checkpointing.restore_subtree(workdir, target, step)
  return RestoredModel(config, graphdef, restored["ema_params"], restored.get("model_state", model_state),
                       step, mesh, rules)


_FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints/).",
                      required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
  flags.DEFINE_integer("num_samples", 64, "How many images to sample.")
  flags.DEFINE_float("cfg_scale", 1.5, "Classifier-free guidance scale (1.0 = none).")
  flags.DEFINE_integer("num_steps", 250, "Sampling steps (respacing for ddpm/ddim, solver steps for dpm).")
  flags.DEFINE_enum("sampler", "ddpm", list(SAMPLERS), "Sampler.")
  flags.DEFINE_float("eta", 0.0, "DDIM eta.")
  flags.DEFINE_bool("clip_denoised", False, "Clip predicted x0 to [-1, 1] (every sampler; DiT: off).")
  flags.DEFINE_integer("seed", 0, "Seed for noise and (without --labels) the random labels.")
  flags.DEFINE_string("labels", "", "Comma-separated class labels, repeated to --num_samples "
                      "(default: uniform random).")
  flags.DEFINE_integer("batch_size", 64, "Images per compiled sampling batch.")
  flags.DEFINE_integer("grid_size", 64, "How many of the samples go into grid.png.")
  flags.DEFINE_string("out", None, "Output folder (default under <workdir>/samples/).")


def main(argv: Sequence[str]) -> None:
  del argv
  jax.config.update("jax_threefry_partitionable", True)
  if _FLAGS.num_samples < 1:
    raise app.UsageError("--num_samples must be >= 1.")
  restored = load_ema_params(_FLAGS.workdir, _FLAGS.step)
  step = restored.step
  labels = parse_labels(_FLAGS.labels, _FLAGS.num_samples, int(restored.config.model.num_classes),
                        rng=np.random.default_rng(_FLAGS.seed))
  with jax.set_mesh(restored.mesh), nnx.logical_axis_rules(restored.rules):
    images = sample_images(restored.graphdef, restored.ema_params, restored.model_state, restored.config,
                           labels=labels, rng=jax.random.key(_FLAGS.seed), sampler=_FLAGS.sampler,
                           num_steps=_FLAGS.num_steps, cfg_scale=_FLAGS.cfg_scale, eta=_FLAGS.eta,
                           clip_denoised=_FLAGS.clip_denoised, batch_size=_FLAGS.batch_size,
                           batch_sharding=sharding.batch_sharding(restored.mesh, restored.rules, 1))
  out = _FLAGS.out or os.path.join(
      _FLAGS.workdir, "samples", f"{_FLAGS.sampler}{_FLAGS.num_steps}_cfg{_FLAGS.cfg_scale:g}_step{step}")
  if jax.process_index() == 0:
    save_png(image_grid(images[:_FLAGS.grid_size]), os.path.join(out, "grid.png"))
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "samples.npz"), arr_0=images, labels=labels)
    logging.info("Wrote %d samples of step %d to %s (grid.png, samples.npz).", len(images), step, out)
    print(f"wrote {len(images)} samples {images.shape} of step {step} to {out}")


if __name__ == "__main__":
  _define_flags()
  app.run(exit_on_input_error(main))
