"""The DiG/DiT training loop: `train_and_evaluate(config, workdir)`.

Shape of the program (big_vision's one readable loop, maxtext's functional NNX step):
1. Mesh and logical-axis rules from the config (dig_jax/sharding.py); checks that fail early with one clear
   error: latent configs (VAE pending), a batch that does not split over the data-parallel devices, a model
   whose input size/channels/classes do not match the data.
2. The train state is a plain pytree ``{"step", "params", "opt_state", "ema_params"[, "model_state"]}`` of
   pure dicts (``nnx.to_pure_dict`` layout). The model is split once, with ``nnx.eval_shape``, into a graphdef
   and abstract states; shardings come from the parameters' logical axis names; a jitted init with
   ``out_shardings`` creates every array directly in its shards. ``model_state`` holds the non-trainable
   variables (the sin-cos position table), carried but never optimised.
3. `train_step(state, batch, rng)` is a module-level pure function: RNG = ``fold_in(rng, step)`` split into
   timestep / noise / label-drop keys; loss = mean of ``diffusion.training_losses(...)["loss"]``; optax AdamW;
   EMA of the parameters (initialised from the model, updated every step). It is jitted once with in/out
   shardings and ``donate_argnums=(0,)``, lowered and compiled before the loop (``memory_analysis()`` logged).
4. Orbax checkpoints of state + input-iterator state (dig_jax/checkpointing.py), resumed automatically from
   the workdir (``workdir/config.json`` is rewritten only once the state is restored or initialised, so a
   resume that fails, e.g. on a changed model, keeps it and names the changed fields); a new run can start
   from converted official weights (``config.init_from``, a folder written by ``python -m dig_jax.convert
   import``: fresh optimizer, EMA = those weights); metrics every ``log_every_steps`` (a non-finite loss
   raises FloatingPointError); an EMA sample grid every ``sample_every_steps`` and at the end in
   ``workdir/samples/step_XXXXXXX.png``.

Deviations from the official PyTorch loop: the EMA update runs inside the jitted step on the new parameters
(DiT: right after ``opt.step()``, the same thing); model outputs are cast to float32 before the loss so bf16
compute keeps an fp32 loss; metrics are pulled to the host only on log/checkpoint steps.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from dig_jax import checkpointing, convert, diffusion as diffusion_lib, input_pipeline, metric_writers, models
from dig_jax import optim
from dig_jax import sample as sample_lib
from dig_jax import sharding

TrainState = dict[str, Any]


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, diffusion: Any, lr_schedule: optax.Schedule,
               ema_decay: float, label_dropout: bool, log_every_steps: int = 1,
               num_train_steps: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch; pure, so it can be jitted with shardings and donation.

  The grad/param/update norms are a few hundred small reductions (14 % of a DiG-S/2 256 px step on an H200,
  benchmarks/NOTES.md), so they are computed only on the steps the loop logs (`log_every_steps`, and the last
  step); on other steps they are reported as 0.
  """
  step = state["step"]
  t_key, noise_key, drop_key = jax.random.split(jax.random.fold_in(rng, step), 3)
  images, labels = batch["image"], batch["label"]
  t = diffusion_lib.sample_timesteps(t_key, images.shape[0], diffusion.num_timesteps)
  noise = jax.random.normal(noise_key, images.shape, images.dtype)
  model_state = state.get("model_state", {})

  def loss_fn(params):
    model = nnx.merge(graphdef, params, model_state)
    drop_rng = drop_key if label_dropout else None
    model_fn = lambda x, tt: model(x, tt, labels, label_drop_rng=drop_rng).astype(jnp.float32)
    terms = diffusion.training_losses(model_fn, images, t, noise)
    terms = {name: jnp.mean(value) for name, value in terms.items()}
    return terms["loss"], terms

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p.astype(e.dtype),
                            state["ema_params"], params)
  is_log_step = ((step + 1) % log_every_steps == 0) | (step + 1 == num_train_steps)

  def all_norms():
    # The barrier keeps XLA from hoisting the norms' partial sums out of the conditional into the optimizer
    # update's fusions (seen on an H100: every step then paid for them, in slower reduction-style kernels).
    trees = jax.lax.optimization_barrier((grads, params, updates))
    return tuple(optax.tree.norm(tree).astype(jnp.float32) for tree in trees)

  norms = jax.lax.cond(is_log_step, all_norms, lambda: (jnp.zeros((), jnp.float32),) * 3)
  metrics = dict(terms, grad_norm=norms[0], param_norm=norms[1], update_norm=norms[2],
                 learning_rate=lr_schedule(step))
  new_state = dict(state, step=step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
  return new_state, metrics


def _init_state(rng: jax.Array, *, model_config: ml_collections.ConfigDict,
                tx: optax.GradientTransformation) -> TrainState:
  model = models.create_model(model_config, rngs=nnx.Rngs(rng))
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  return _state_from_params(nnx.to_pure_dict(params), nnx.to_pure_dict(model_state), tx=tx)


def _state_from_params(params: Any, model_state: Any, *, tx: optax.GradientTransformation) -> TrainState:
  """Step 0 state around given parameters (fresh or ``config.init_from``): new optimizer, EMA = params."""
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           # EMA starts as a copy of the model (DiT: update_ema(ema, model, decay=0)); `+ 0` gives it its own
           # buffers, so donating the state never donates one buffer twice.
           "ema_params": jax.tree.map(lambda p: p + jnp.zeros((), p.dtype), params)}
  if jax.tree.leaves(model_state):
    state["model_state"] = model_state
  return state


def _state_shardings(abstract_state: TrainState, abstract_model: nnx.Module, tx: optax.GradientTransformation,
                     mesh: jax.sharding.Mesh, rules: sharding.Rules) -> TrainState:
  _, params, model_state = nnx.split(abstract_model, nnx.Param, ...)
  param_shardings = sharding.state_shardings(params, mesh, rules)
  repl = sharding.replicated(mesh)
  out = {"step": repl, "params": param_shardings, "ema_params": param_shardings,
         "opt_state": optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"], param_shardings,
                                            transform_non_params=lambda _: repl)}
  if "model_state" in abstract_state:
    out["model_state"] = sharding.state_shardings(model_state, mesh, rules)
  return out


def _check_config(config: ml_collections.ConfigDict, data_info: dict[str, Any]) -> None:
  model = config.model
  size = model.input_size
  hw = (size, size) if isinstance(size, int) else tuple(size)
  data_hw = (data_info["image_size"], data_info["image_size"])
  if hw != data_hw or model.in_channels != data_info["channels"]:
    raise ValueError(f"The model expects {hw} images with {model.in_channels} channels but the data gives "
                     f"{data_hw} with {data_info['channels']}; set config.model.input_size/in_channels to "
                     "match config.input.image_size/channels.")
  if data_info.get("num_classes") and data_info["num_classes"] > model.num_classes:
    raise ValueError(f"The data has {data_info['num_classes']} classes but config.model.num_classes is "
                     f"{model.num_classes}.")
  for name in ("num_train_steps", "log_every_steps", "checkpoint_every_steps"):
    if int(config[name]) <= 0:
      raise ValueError(f"config.{name} must be positive, got {config[name]}.")
  if not 0.0 <= float(config.ema_decay) <= 1.0:
    raise ValueError(f"config.ema_decay must be in [0, 1], got {config.ema_decay}.")


def _saved_model_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The model section of ``workdir/config.json`` (stack_blocks always set: False for old workdirs), or None."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return None
  return sample_lib.load_config(workdir).get("model")


def _check_resumable_layout(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir's checkpoints hold per-block or stacked block parameters; resuming needs the same layout."""
  if not os.path.isdir(checkpointing.checkpoint_dir(workdir)):
    return
  saved = _saved_model_config(workdir)
  if saved is not None and saved.stack_blocks != models.resolve_model_config(config.model).stack_blocks:
    raise ValueError(
        f"{workdir} holds a run with model.stack_blocks={saved.stack_blocks} (block parameters "
        f"{'stacked' if saved.stack_blocks else 'stored per block'}); resume it with "
        f"--config.model.stack_blocks={saved.stack_blocks}, or start a new workdir")


def _saved_model_differences(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """'model.<field>: <saved> (saved) vs <this run>' for every model field that differs from config.json.

  This run's model config goes through JSON as `_write_config` would store it, so tuples compare as lists.
  """
  saved = _saved_model_config(workdir)
  if saved is None:
    return []
  ours = ml_collections.ConfigDict(json.loads(config.model.to_json_best_effort()))
  old, new = _flatten_config(saved, "model."), _flatten_config(ours, "model.")
  return [f"{key}: {old.get(key, '<unset>')!r} (saved) vs {new.get(key, '<unset>')!r} (this run)"
          for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _log_compiled(compiled: Any) -> None:
  try:
    memory = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-exception-caught  (not every backend implements it)
    memory = None
  if memory is not None:
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "alias_size_in_bytes")
    logging.info("train_step memory (per device): %s",
                 ", ".join(f"{f[:-9]}={getattr(memory, f, 0) / 2**20:.1f} MiB" for f in fields))


def _grid_labels(config: ml_collections.ConfigDict) -> np.ndarray:
  return sample_lib.parse_labels(config.sample.labels, int(config.sample.num_images),
                                 int(config.model.num_classes))


def _host_metrics(metrics: dict[str, jax.Array], step: int) -> dict[str, float]:
  values = {name: float(v) for name, v in jax.device_get(metrics).items()}
  bad = {name: v for name, v in values.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"Non-finite training metrics at step {step}: {bad}. Lower config.optim.learning_rate, enable "
        "config.optim.grad_clip_norm or warm-up, or use float32 compute (config.model.dtype).")
  return values


def _flatten_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{"<prefix>a.b": value} for every leaf of a nested config, keys sorted level by level."""
  out = {}
  for key, value in sorted(config.to_dict().items()):
    if isinstance(value, dict):
      out.update(_flatten_config(ml_collections.ConfigDict(value), f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {key: value for key, value in _flatten_config(config).items()
          if isinstance(value, (int, float, str, bool)) or value is None}


def _build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: sharding.Rules, tx: Any,
           init_rng: jax.Array) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, abstract train state with shardings, the shardings); call under the mesh and rules."""
  abstract_model = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
  graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  abstract_state = jax.eval_shape(functools.partial(_init_state, model_config=config.model, tx=tx), init_rng)
  shardings = _state_shardings(abstract_state, abstract_model, tx, mesh, rules)
  num_params = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_state["params"]))
  logging.info("Model %s: %s parameters.", config.get("model_name") or config.model.arch, f"{num_params:,}")
  return graphdef, sharding.with_shardings(abstract_state, shardings), shardings


def _compile_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, abstract_state: TrainState,
                        state_shardings: TrainState, abstract_batch: dict[str, jax.ShapeDtypeStruct], tx: Any,
                        lr_schedule: optax.Schedule, rng: jax.Array, mesh: jax.sharding.Mesh) -> Any:
  """`train_step` jitted with shardings and donation, lowered and compiled once."""
  diffusion = diffusion_lib.create_diffusion(
      "", num_timesteps=int(config.diffusion.num_timesteps),
      noise_schedule=str(config.diffusion.noise_schedule), learn_sigma=bool(config.model.learn_sigma),
      min_snr_gamma=float(config.diffusion.min_snr_gamma))
  step_fn = functools.partial(
      train_step, graphdef=graphdef, tx=tx, diffusion=diffusion, lr_schedule=lr_schedule,
      ema_decay=float(config.ema_decay), label_dropout=float(config.model.class_dropout_prob) > 0,
      log_every_steps=int(config.log_every_steps), num_train_steps=int(config.num_train_steps))
  repl = sharding.replicated(mesh)
  batch_shardings = jax.tree.map(lambda a: a.sharding, abstract_batch)
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, repl),
                   out_shardings=(state_shardings, repl), donate_argnums=(0,))
  t0 = time.time()
  compiled = jitted.lower(abstract_state, abstract_batch, rng).compile()
  logging.info("Compiled train_step in %.1f s.", time.time() - t0)
  _log_compiled(compiled)
  return compiled


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike[str]) -> dict[str, float]:
  """Trains (or resumes) in `workdir` up to ``config.num_train_steps``; returns the last logged metrics."""
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  sample_lib.require_pixel_space(config)
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.logical_axis_rules)
  global_batch = int(config.input.batch_size)
  sharding.check_mesh_axes_used(mesh, rules)
  sharding.check_global_batch(global_batch, mesh, rules)
  logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size, jax.process_count())

  train_iter = input_pipeline.create_train_iterator(config.input, seed=int(config.seed))
  _check_config(config, train_iter.info)
  _check_resumable_layout(config, workdir)
  num_steps, log_every = int(config.num_train_steps), int(config.log_every_steps)
  tx, lr_schedule = optim.create_optimizer(config.optim, num_steps)
  init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(int(config.seed)), 3)
  size, channels = train_iter.info["image_size"], train_iter.info["channels"]
  abstract_batch = {
      "image": jax.ShapeDtypeStruct((global_batch, size, size, channels), jnp.float32,
                                    sharding=sharding.batch_sharding(mesh, rules, 4)),
      "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32,
                                    sharding=sharding.batch_sharding(mesh, rules, 1))}

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                                asynchronous=True)
  # The writer is flushed and closed however the run ends (an error below must not leave its background
  # queue to be torn down at interpreter exit, nor drop the metrics already written).
  with contextlib.closing(writer), jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, abstract_state, state_shardings = _build(config, mesh, rules, tx, init_rng)
    manager = checkpointing.create_manager(
        workdir, every_steps=int(config.checkpoint_every_steps), keep=int(config.keep_checkpoints),
        keep_every=int(config.keep_every_steps), asynchronous=bool(config.async_checkpointing))
    try:
      state, start_step = checkpointing.restore_latest(manager, abstract_state, train_iter)
    except RuntimeError as e:  # Most often a changed model config: say which fields (config.json is kept).
      differences = _saved_model_differences(config, workdir)
      if not differences:
        raise
      raise RuntimeError(f"{e}\nThe model config differs from the one saved in {workdir}/config.json (kept "
                         "unchanged): " + "; ".join(differences) + ". Resume with the saved settings or "
                         "start a new workdir.") from e
    if state is None and config.get("init_from"):
      params, model_state = convert.load_imported(
          config.init_from, config.model, abstract_state["params"], abstract_state.get("model_state", {}))
      state = jax.jit(functools.partial(_state_from_params, tx=tx), out_shardings=state_shardings)(
          params, model_state)
      logging.info("Initialised the parameters from %s.", config.init_from)
    elif state is None:
      init = functools.partial(_init_state, model_config=config.model, tx=tx)
      state = jax.jit(init, out_shardings=state_shardings)(init_rng)
      logging.info("Initialised a new train state.")
    else:
      logging.info("Resuming from step %d.", start_step)
    # Written once the state is in hand, so a run that fails to restore leaves the saved config as it was.
    _write_config(config, workdir)
    compiled = _compile_train_step(config, graphdef, abstract_state, state_shardings, abstract_batch, tx,
                                   lr_schedule, train_rng, mesh)
    grid_sampler = sample_lib.ImageSampler(  # Compiled at its first use.
        graphdef, config, sampler=str(config.sample.sampler), num_steps=int(config.sample.num_steps),
        cfg_scale=float(config.sample.cfg_scale), eta=float(config.sample.eta),
        clip_denoised=bool(config.sample.clip_denoised),
        batch_sharding=sharding.batch_sharding(mesh, rules, 1))

    def write_samples(step: int) -> None:
      if int(config.sample.num_images) <= 0:
        return
      images = grid_sampler(state["ema_params"], state.get("model_state", {}), _grid_labels(config),
                            jax.random.fold_in(sample_rng, int(config.sample.seed)))
      if jax.process_index() == 0:
        num_classes = int(config.model.num_classes)  # Default labels 0, 1, 2, ...: one column per class.
        columns = min(num_classes, len(images)) if not config.sample.labels and num_classes <= 32 else None
        grid = sample_lib.image_grid(images, columns)
        sample_lib.save_png(grid, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        writer.write_images(step, {"samples": grid[None]})

    if start_step == 0:
      writer.write_hparams(_flat_hparams(config))
    # Logs progress and ETA; steps/s goes to the writer from the loop (train/steps_per_sec).
    progress = metric_writers.ReportProgress(num_train_steps=num_steps, every_steps=log_every,
                                             every_secs=None)
    sample_every = int(config.sample_every_steps)
    last_metrics: dict[str, float] = {}
    step = start_step
    log_t0, log_step0 = time.time(), start_step
    for step in range(start_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.host_to_global(next(train_iter), mesh, rules)
        state, metrics = compiled(state, batch, train_rng)
      progress(step)
      is_last, is_log_step = step == num_steps, step % log_every == 0 or step == num_steps
      if is_log_step or manager.should_save(step):  # Never checkpoint a non-finite state unchecked.
        last_metrics = _host_metrics(metrics, step)
        if is_log_step:
          now = time.time()
          last_metrics["steps_per_sec"] = (step - log_step0) / max(now - log_t0, 1e-9)
          log_t0, log_step0 = now, step
          writer.write_scalars(step, {f"train/{k}": v for k, v in last_metrics.items()})
      checkpointing.save(manager, step, state, train_iter, force=is_last)
      if sample_every > 0 and step % sample_every == 0 and not is_last:
        write_samples(step)
      if checkpointing.reached_preemption(manager, step):
        logging.warning("Preemption at step %d: checkpoint written, stopping.", step)
        break
    else:  # Not preempted: the final checkpoint (a no-op if this step is saved) and the final grid.
      checkpointing.save(manager, num_steps, state, train_iter, force=True)
      write_samples(num_steps)

    checkpointing.wait_and_close(manager)
  return dict(last_metrics, step=float(step))
