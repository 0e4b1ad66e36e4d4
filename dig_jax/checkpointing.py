"""Orbax checkpoints of the train state and the input iterator, saved together so resume is exact.

One ``CheckpointManager`` under ``workdir/checkpoints`` with two items per step:
- ``state``: the train-state pytree (step, params, opt_state, ema_params, model_state), ``StandardSave``;
- ``data``: the input iterator's state through grain's checkpoint handler, one JSON file per process
  (``process_<i>-of-<n>.json``), so every process of a multi-host job resumes its own slice.

Policies: save every ``every_steps`` steps and when JAX's preemption service reports a SIGTERM (active only
after ``jax.distributed.initialize``); keep the newest ``keep`` steps plus every multiple of ``keep_every``;
async saving (device arrays are copied to host before ``save`` returns, so the next step may donate them); a
half-written ``<step>.orbax-checkpoint-tmp`` left by a crash is ignored and cleaned up. Restore walks the
steps from newest to oldest and takes the first one that loads (orbax does not checksum steps); newer
unreadable steps are then deleted, since orbax would not save a step at or below its latest one. Each step's
array shapes are first compared with the wanted state's through the step's metadata file, and a mismatched
step is reported without calling ``manager.restore``: orbax's async restore of mismatched shapes once hung
for good in asyncio's task cancellation (where pytest-timeout's signal could not end it).

Deviation from the brief's ``JsonSave`` for the data item: grain's handler writes one file per process, which
``JsonSave`` (primary host only) cannot.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from dig_jax.models.partitioning import path_str

STATE = "state"
DATA = "data"
CHECKPOINT_DIR = "checkpoints"
MAX_LISTED_MISMATCHES = 10


def checkpoint_dir(workdir: str | os.PathLike[str]) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


def create_manager(workdir: str | os.PathLike[str], *, every_steps: int, keep: int = 3, keep_every: int = 0,
                   asynchronous: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """The manager for ``workdir/checkpoints`` (created if missing, unless read_only)."""
  if every_steps <= 0:
    raise ValueError(f"config.checkpoint_every_steps must be positive, got {every_steps}.")
  if keep <= 0:
    raise ValueError(f"config.keep_checkpoints must be positive, got {keep}.")
  policies = ocp.checkpoint_managers
  preserve = [policies.LatestN(keep)]
  if keep_every > 0:
    preserve.append(policies.EveryNSteps(keep_every))
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.AnySavePolicy(
          [policies.FixedIntervalPolicy(every_steps), policies.PreemptionCheckpointingPolicy()]),
      preservation_policy=policies.AnyPreservationPolicy(preserve),
      enable_async_checkpointing=asynchronous,
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=(STATE, DATA))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any, *,
         force: bool = False) -> bool:
  """Saves state and iterator at `step` if the policy (or `force`) says so; returns whether it saved."""
  if not force and not manager.should_save(step):
    return False
  if step in manager.all_steps():
    return False
  args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                               DATA: grain.checkpoint.CheckpointSave(data_iterator)})
  saved = manager.save(step, args=args, force=True)
  if saved:
    logging.info("Saving checkpoint for step %d to %s.", step, manager.directory)
  return saved


def _saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...] | None] | None:
  """{path: shape} of the train state saved at `step`, from its metadata file alone (no array is read).

  The step lives in orbax's default ``<directory>/<step>`` (``create_manager`` sets no step-name format).
  Returns None when the metadata cannot be read (the caller's restore then reports the broken step); a leaf
  without a shape (not an array) maps to None.
  """
  path = ocp.step.build_step_path(manager.directory, ocp.step.standard_name_format(), step) / STATE
  handler = ocp.StandardCheckpointHandler()
  try:
    metadata = handler.metadata(path)
  except Exception as e:  # pylint: disable=broad-exception-caught  (restore reports the step's own error)
    logging.warning("Could not read the metadata of checkpoint step %d (%s: %s).", step, type(e).__name__, e)
    return None
  finally:
    handler.close()
  leaves = jax.tree_util.tree_flatten_with_path(metadata)[0]
  return {path_str(p): (tuple(leaf.shape) if getattr(leaf, "shape", None) is not None else None)
          for p, leaf in leaves}


def _shape_mismatches(saved: dict[str, tuple[int, ...] | None], abstract: Any, *,
                      partial: bool = False) -> list[str]:
  """One line per array whose saved shape differs from `abstract`'s, or that only one side has.

  Dtypes are not compared: ``StandardRestore`` casts them. With `partial`, arrays saved but not wanted are
  fine (a partial restore skips them).
  """
  wanted = {path_str(p): getattr(leaf, "shape", None)
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  lines = []
  for name in sorted(saved.keys() | wanted.keys()):
    if name not in wanted:
      if not partial:
        lines.append(f"{name}: saved {saved[name]}, not in this state")
    elif name not in saved:
      lines.append(f"{name}: not saved, expected {tuple(wanted[name])}")
    elif saved[name] is not None and wanted[name] is not None and saved[name] != tuple(wanted[name]):
      lines.append(f"{name}: saved {saved[name]}, expected {tuple(wanted[name])}")
  return lines


def _step_mismatches(manager: ocp.CheckpointManager, step: int, abstract: Any, *,
                     partial: bool = False) -> list[str]:
  """`_shape_mismatches` of the step's saved arrays against `abstract`; [] when its metadata is unreadable
  (the restore itself then reports the step's error)."""
  saved = _saved_shapes(manager, step)
  return [] if saved is None else _shape_mismatches(saved, abstract, partial=partial)


def _describe_mismatches(lines: list[str]) -> str:
  listed = lines[:MAX_LISTED_MISMATCHES]
  more = f"\n    ... and {len(lines) - len(listed)} more" if len(lines) > len(listed) else ""
  return (f"the saved arrays do not match the wanted state ({len(lines)} differ):\n    "
          + "\n    ".join(listed) + more)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iterator: Any) -> tuple[Any, int]:
  """Restores the newest loadable step into `abstract_state`'s shardings and `data_iterator` (in place).

  Returns:
    (state, step), or (None, 0) when the directory holds no checkpoint.

  Raises:
    RuntimeError: if steps exist but none of them loads.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  errors = []
  listed: tuple[int, list[str]] | None = None  # (step, mismatches) last spelled out in `errors`
  for step in steps:
    mismatches = _step_mismatches(manager, step, abstract_state)
    if mismatches:  # Not handed to orbax, whose async restore of mismatched shapes once hung.
      logging.warning("Checkpoint step %d does not match the train state (mismatched arrays: %d); trying an "
                      "older one.", step, len(mismatches))
      if listed is not None and listed[1] == mismatches:  # Usually every kept step: say it once.
        errors.append(f"step {step}: the same mismatch as step {listed[0]}")
      else:
        errors.append(f"step {step}: {_describe_mismatches(mismatches)}")
        listed = (step, mismatches)
      continue
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                 DATA: grain.checkpoint.CheckpointRestore(data_iterator)})
    try:
      restored = manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-exception-caught  (a corrupt step: try the previous one)
      logging.warning("Could not restore checkpoint step %d (%s: %s); trying an older one.", step,
                      type(e).__name__, e)
      errors.append(f"step {step}: {type(e).__name__}: {e}")
      continue
    logging.info("Restored checkpoint step %d from %s.", step, manager.directory)
    for bad_step in steps[:steps.index(step)]:
      # Unreadable newer steps would block saving (orbax skips steps <= its latest); they are of no use.
      logging.warning("Deleting unreadable checkpoint step %d.", bad_step)
      manager.delete(bad_step)
    return restored[STATE], step
  if errors:
    raise RuntimeError(f"No checkpoint in {manager.directory} could be restored; delete the directory to "
                       "start over, or fix the mismatch:\n  " + "\n  ".join(errors))
  return None, 0


def restore_subtree(workdir: str | os.PathLike[str], abstract_subtree: dict[str, Any],
                    step: int | None = None) -> tuple[dict[str, Any], int]:
  """Restores only some keys of the train state (e.g. ``{"ema_params": ...}``) from a workdir.

  Args:
    workdir: the training workdir.
    abstract_subtree: ShapeDtypeStructs (with shardings) for the wanted top-level keys of the train state.
    step: the step to load; the newest one when None.

  Returns:
    (the restored subtree, its step).

  Raises:
    ValueError: naming the arrays whose saved shapes differ from `abstract_subtree`'s (checked first).
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoints under {directory}; train first with python -m dig_jax.main "
                            f"--workdir={workdir}.")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  manager = ocp.CheckpointManager(directory, options=options, item_names=(STATE, DATA))
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} in {directory}; available: {sorted(steps)}.")
    mismatches = _step_mismatches(manager, step, abstract_subtree, partial=True)
    if mismatches:
      raise ValueError(f"Checkpoint step {step} in {directory}: {_describe_mismatches(mismatches)}")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
    partial = ocp.args.PyTreeRestore(item=abstract_subtree, restore_args=restore_args, partial_restore=True)
    args = ocp.args.Composite(**{STATE: partial})
    restored = manager.restore(step, args=args)[STATE]
  finally:
    manager.close()
  return dict(restored), int(step)


def wait_and_close(manager: ocp.CheckpointManager) -> None:
  manager.wait_until_finished()
  manager.close()


def reached_preemption(manager: ocp.CheckpointManager, step: int) -> bool:
  """True once all processes agree a preemption signal arrived (needs jax.distributed; else always False)."""
  try:
    return bool(manager.reached_preemption(step))
  except Exception:  # pylint: disable=broad-exception-caught  (no distributed runtime: nothing to sync)
    return False
