"""Checkpoint restore: a step whose array shapes differ from the wanted state is reported from its metadata
file, without entering orbax's (async) restore; matching steps and steps with unreadable metadata still go
through ``manager.restore``. A tiny dict state and a grain iterator over a list: no model, no data files.
"""

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dig_jax import checkpointing


def _iterator(position=0):
  iterator = iter(grain.MapDataset.source(list(range(16))).to_iter_dataset())
  for _ in range(position):
    next(iterator)
  return iterator


def _state(step, size=4):
  return {"step": jax.numpy.int32(step), "params": {"w": jax.numpy.full((size,), float(step)),
                                                    "b": jax.numpy.zeros((2, 3))}}


def _abstract(size=4):
  return jax.eval_shape(lambda: _state(0, size))


def _manager(tmp_path, states):
  """A synchronous manager over tmp_path with `states` ({step: state}, saved with the iterator at `step`)."""
  manager = checkpointing.create_manager(str(tmp_path), every_steps=1, asynchronous=False)
  for step, state in states.items():
    assert checkpointing.save(manager, step, state, _iterator(step))
  manager.wait_until_finished()
  return manager


def _spy_restore(manager, monkeypatch, forbid=False):
  """Records the steps handed to manager.restore (and fails them, when `forbid`)."""
  calls, original = [], manager.restore

  def restore(step, *args, **kwargs):
    calls.append(step)
    if forbid:
      raise AssertionError("manager.restore must not be called for a mismatched step")
    return original(step, *args, **kwargs)

  monkeypatch.setattr(manager, "restore", restore)
  return calls


def _state_dir(tmp_path, step):
  return os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), str(step), checkpointing.STATE)


def test_step_directory_is_where_the_manager_writes_it(tmp_path):
  manager = _manager(tmp_path, {3: _state(3)})
  assert os.path.isfile(os.path.join(_state_dir(tmp_path, 3), "_METADATA"))
  saved = checkpointing._saved_shapes(manager, 3)  # pylint: disable=protected-access
  assert saved == {"step": (), "params/w": (4,), "params/b": (2, 3)}
  checkpointing.wait_and_close(manager)


def test_mismatched_shapes_name_the_arrays_without_calling_orbax_restore(tmp_path, monkeypatch):
  manager = _manager(tmp_path, {1: _state(1), 2: _state(2)})
  calls = _spy_restore(manager, monkeypatch, forbid=True)
  abstract = _abstract(size=5)
  abstract["params"]["new"] = jax.ShapeDtypeStruct((7,), np.float32)
  del abstract["params"]["b"]
  with pytest.raises(RuntimeError) as info:
    checkpointing.restore_latest(manager, abstract, _iterator())
  message = str(info.value)
  assert calls == []  # orbax's restore was never entered
  assert "step 2: the saved arrays do not match the wanted state (3 differ):" in message
  assert message.count("params/w: saved (4,), expected (5,)") == 1
  assert message.count("params/new: not saved, expected (7,)") == 1
  assert message.count("params/b: saved (2, 3), not in this state") == 1
  assert "step 1: the same mismatch as step 2" in message  # not listed twice
  assert message.index("step 2:") < message.index("step 1:")
  assert manager.all_steps() == [1, 2]  # nothing deleted when no step loads
  checkpointing.wait_and_close(manager)


def test_steps_with_different_mismatches_are_each_listed(tmp_path, monkeypatch):
  manager = _manager(tmp_path, {1: _state(1, size=6), 2: _state(2), 3: _state(3)})
  _spy_restore(manager, monkeypatch, forbid=True)
  with pytest.raises(RuntimeError) as info:
    checkpointing.restore_latest(manager, _abstract(size=5), _iterator())
  lines = str(info.value).splitlines()[1:]
  assert lines == ["  step 3: the saved arrays do not match the wanted state (1 differ):",
                   "    params/w: saved (4,), expected (5,)",
                   "  step 2: the same mismatch as step 3",
                   "  step 1: the saved arrays do not match the wanted state (1 differ):",
                   "    params/w: saved (6,), expected (5,)"]
  checkpointing.wait_and_close(manager)


def test_at_most_ten_mismatches_are_listed_per_step(tmp_path, monkeypatch):
  state = {f"p{i:02d}": jax.numpy.zeros((i + 1,)) for i in range(12)}
  manager = _manager(tmp_path, {1: state})
  _spy_restore(manager, monkeypatch, forbid=True)
  abstract = {k: jax.ShapeDtypeStruct((v.shape[0] + 1,), v.dtype) for k, v in state.items()}
  with pytest.raises(RuntimeError) as info:
    checkpointing.restore_latest(manager, abstract, _iterator())
  message = str(info.value)
  assert "(12 differ)" in message and "p09: saved (10,), expected (11,)" in message
  assert "p10:" not in message and "... and 2 more" in message
  checkpointing.wait_and_close(manager)


def test_a_mismatched_newest_step_is_skipped_for_an_older_matching_one(tmp_path, monkeypatch):
  manager = _manager(tmp_path, {1: _state(1), 2: _state(2, size=6)})
  calls = _spy_restore(manager, monkeypatch)
  fresh = _iterator()
  restored, step = checkpointing.restore_latest(manager, _abstract(), fresh)
  assert calls == [1]  # step 2 was rejected from its metadata, before orbax
  assert step == 1
  np.testing.assert_array_equal(restored["params"]["w"], np.ones(4))
  assert fresh.get_state() == _iterator(1).get_state()
  assert manager.all_steps() == [1]  # the unusable newer step is deleted, as an unreadable one is
  checkpointing.wait_and_close(manager)


def test_a_matching_step_restores_its_values_and_iterator(tmp_path, monkeypatch):
  manager = _manager(tmp_path, {1: _state(1), 2: _state(2)})
  calls = _spy_restore(manager, monkeypatch)
  fresh = _iterator()
  restored, step = checkpointing.restore_latest(manager, _abstract(), fresh)
  assert calls == [2] and step == 2 and int(restored["step"]) == 2
  np.testing.assert_array_equal(restored["params"]["w"], np.full(4, 2.0))
  np.testing.assert_array_equal(restored["params"]["b"], np.zeros((2, 3)))
  assert fresh.get_state() == _iterator(2).get_state() != _iterator(0).get_state()
  assert manager.all_steps() == [1, 2]
  checkpointing.wait_and_close(manager)


def test_an_empty_directory_restores_nothing(tmp_path):
  manager = _manager(tmp_path, {})
  assert checkpointing.restore_latest(manager, _abstract(), _iterator()) == (None, 0)
  checkpointing.wait_and_close(manager)


@pytest.mark.parametrize("damage,error", [("missing", "FileNotFoundError"), ("corrupt", "JSONDecodeError")])
def test_unreadable_metadata_falls_through_to_orbax_restore(tmp_path, monkeypatch, damage, error):
  manager = _manager(tmp_path, {1: _state(1), 2: _state(2)})
  metadata_file = os.path.join(_state_dir(tmp_path, 2), "_METADATA")
  if damage == "missing":
    os.remove(metadata_file)
  else:
    with open(metadata_file, "w", encoding="utf-8") as f:
      f.write("{not json")
  assert checkpointing._saved_shapes(manager, 2) is None  # pylint: disable=protected-access
  calls = _spy_restore(manager, monkeypatch)
  with pytest.raises(RuntimeError) as info:  # wrong shapes: step 1 is rejected from its metadata
    checkpointing.restore_latest(manager, _abstract(size=5), _iterator())
  assert calls == [2]  # step 2 went to orbax, whose error is reported
  assert f"step 2: {error}" in str(info.value)
  assert "step 1: the saved arrays do not match" in str(info.value)
  restored, step = checkpointing.restore_latest(manager, _abstract(), _iterator())  # right shapes
  assert calls == [2, 2, 1] and step == 1
  np.testing.assert_array_equal(restored["params"]["w"], np.ones(4))
  assert manager.all_steps() == [1]  # the unreadable newer step is deleted
  checkpointing.wait_and_close(manager)


def test_restore_subtree_checks_shapes_of_the_wanted_keys_only(tmp_path, monkeypatch):
  checkpointing.wait_and_close(_manager(tmp_path, {1: _state(1)}))
  calls = []
  original = ocp.CheckpointManager.restore

  def restore(self, step, *args, **kwargs):
    calls.append(step)
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  wanted = {"params": _abstract()["params"]}  # "step" is saved but not wanted: fine for a partial restore
  restored, step = checkpointing.restore_subtree(str(tmp_path), wanted)
  assert step == 1 and calls == [1]
  np.testing.assert_array_equal(restored["params"]["w"], np.ones(4))
  with pytest.raises(ValueError, match=r"params/w: saved \(4,\), expected \(5,\)"):
    checkpointing.restore_subtree(str(tmp_path), {"params": _abstract(size=5)["params"]})
  assert calls == [1]  # the mismatch was caught before orbax's restore
