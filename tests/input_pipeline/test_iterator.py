"""Determinism, epochs, exact resume and per-process sharding of the grain train iterator."""

import json

import ml_collections
import numpy as np
import pytest

from dig_jax import input_pipeline


def _config(**overrides):
  base = dict(dataset="embedded_mnist", split="test", image_size=32, channels=1, batch_size=8,
              random_flip=True, num_classes=10, num_workers=0)
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _iterator(config, seed=0, process_index=0, process_count=1):
  return input_pipeline.create_train_iterator(config, seed=seed, process_index=process_index,
                                              process_count=process_count)


def _example_keys(batch):
  """One hashable key per example (image bytes + label), to compare sets of examples."""
  return [(image.tobytes(), int(label)) for image, label in zip(batch["image"], batch["label"])]


def _assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])


def test_same_seed_same_batches_different_seed_different():
  config = _config()
  first = _take(_iterator(config, seed=1), 3)
  _assert_batches_equal(first, _take(_iterator(config, seed=1), 3))
  other = _take(_iterator(config, seed=2), 3)
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_epochs_repeat_with_a_new_shuffle():
  # 16 synthetic examples, batch 16: every batch is exactly one epoch.
  config = _config(dataset="synthetic", image_size=4, channels=1, batch_size=16, num_examples=16,
                   random_flip=False)
  epochs = _take(_iterator(config, seed=0), 3)
  keys = [_example_keys(batch) for batch in epochs]
  assert len(set(keys[0])) == 16
  assert set(keys[0]) == set(keys[1]) == set(keys[2]), "each epoch covers the whole dataset once"
  assert keys[0] != keys[1] and keys[1] != keys[2], "each epoch is shuffled differently"


def test_flip_is_applied_to_about_half():
  config = _config(dataset="synthetic", image_size=4, channels=1, batch_size=64, num_examples=64,
                   random_flip=True)
  flipped_batch = next(_iterator(config, seed=0))
  plain_batch = next(_iterator(_config(dataset="synthetic", image_size=4, channels=1, batch_size=64,
                                       num_examples=64, random_flip=False), seed=0))
  # Same order (the flip does not change the shuffle); some images mirrored, the rest untouched.
  np.testing.assert_array_equal(flipped_batch["label"], plain_batch["label"])
  same = [np.array_equal(a, b) for a, b in zip(flipped_batch["image"], plain_batch["image"])]
  mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(flipped_batch["image"], plain_batch["image"])]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 16 <= sum(mirrored) <= 48


@pytest.mark.parametrize("consumed", [3, 70])  # 70 batches of 8 cross the 500-example epoch boundary.
def test_exact_resume_from_json_state(consumed):
  config = _config()
  iterator = _iterator(config, seed=5)
  _take(iterator, consumed)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 4)
  resumed = _iterator(config, seed=5)
  resumed.set_state(state)
  _assert_batches_equal(expected, _take(resumed, 4))


def test_resume_refuses_a_different_setup():
  state = _iterator(_config(), seed=5).get_state()
  other = _iterator(_config(), seed=6)
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)
  with pytest.raises(ValueError, match="TrainIterator state"):
    other.set_state({"next_index": 3})


def test_resume_through_orbax_with_grain_checkpoint_handler(tmp_path):
  import grain
  import orbax.checkpoint as ocp
  config = _config()
  iterator = _iterator(config, seed=9)
  _take(iterator, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    restored = manager.restore(5, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(_iterator(config, seed=9))))
  _assert_batches_equal(expected, _take(restored["data"], 3))


def test_two_processes_read_disjoint_halves_of_the_global_batch():
  config = _config(batch_size=16)
  single = _take(_iterator(config, seed=4), 2)
  shard0 = _take(_iterator(config, seed=4, process_index=0, process_count=2), 2)
  shard1 = _take(_iterator(config, seed=4, process_index=1, process_count=2), 2)
  for step in range(2):
    assert shard0[step]["image"].shape == (8, 32, 32, 1) and shard1[step]["label"].shape == (8,)
    keys0, keys1 = _example_keys(shard0[step]), _example_keys(shard1[step])
    assert not set(keys0) & set(keys1)
    # Together they are exactly the single-process global batch (flips included): element i of the global
    # stream goes to process i % 2.
    assert sorted(keys0 + keys1) == sorted(_example_keys(single[step]))
    np.testing.assert_array_equal(shard0[step]["image"], single[step]["image"][0::2])
    np.testing.assert_array_equal(shard1[step]["image"], single[step]["image"][1::2])


def test_global_batch_must_divide_by_process_count():
  with pytest.raises(ValueError, match="multiple of process_count"):
    _iterator(_config(batch_size=10), process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    _iterator(_config(batch_size=8), process_index=2, process_count=2)
  with pytest.raises(ValueError, match="seed"):
    _iterator(_config(), seed=-1)


def test_default_process_index_comes_from_jax():
  iterator = input_pipeline.create_train_iterator(_config(), seed=0)
  assert iterator.info["process_count"] == 1 and iterator.local_batch_size == 8


def test_worker_processes_resume_exactly():
  config = _config(dataset="synthetic", image_size=4, channels=1, batch_size=4, num_examples=32,
                   num_workers=1)
  iterator = _iterator(config, seed=0)
  try:
    _take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _take(iterator, 3)
  finally:
    iterator.close()
  resumed = _iterator(config, seed=0)
  try:
    resumed.set_state(state)
    _assert_batches_equal(expected, _take(resumed, 3))
  finally:
    resumed.close()
