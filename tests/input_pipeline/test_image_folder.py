"""Image folder -> array_record TFDS dataset -> grain iterator; missing-data errors."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dig_jax import input_pipeline
from dig_jax.data import tfds_source

# Each class is drawn in its own colour, so labels can be checked from the pixels.
CLASS_COLOURS = {"cat": (220, 30, 30), "dog": (30, 220, 30), "zebra": (30, 30, 220)}
IMAGE_SIZES = [(40, 60), (64, 48), (33, 33)]  # (width, height), all different


def _write_folder(root):
  count = 0
  for name, colour in CLASS_COLOURS.items():
    folder = root / name
    folder.mkdir(parents=True)
    for index, size in enumerate(IMAGE_SIZES):
      image = Image.new("RGB", size, colour)
      fmt = "JPEG" if index == 0 else "PNG"
      image.save(folder / f"img{index}.{fmt.lower().replace('jpeg', 'jpg')}", format=fmt)
      count += 1
  Image.new("L", (20, 30), 200).save(root / "zebra" / "grey.png")  # grey image in an RGB dataset
  count += 1
  (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  (root / "cat" / "notes.txt").write_text("not an image, ignored")
  return count


@pytest.fixture(scope="module")
def built_dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  data_dir = tmp_path_factory.mktemp("tfds")
  num_good = _write_folder(root)
  with pytest.warns(UserWarning) as record:
    result = input_pipeline.build_image_folder_dataset(root, data_dir, name="tiny_folder")
  messages = [str(warning.message) for warning in record]
  return result, num_good, messages, root, data_dir


def test_build_skips_corrupt_file_with_warning(built_dataset):
  result, num_good, messages, root, data_dir = built_dataset
  assert any("broken.png" in message and "skipping" in message for message in messages)
  assert any("skipped 1 unreadable image(s)" in message for message in messages)
  assert result.skipped_files == (str(root / "dog" / "broken.png"),)
  assert result.num_examples == num_good == 10
  assert result.class_names == ("cat", "dog", "zebra")
  assert os.path.isfile(os.path.join(data_dir, "tiny_folder", "1.0.0", "dataset_info.json"))


def test_read_back_through_iterator_with_adm_crop(built_dataset):
  _, num_good, _, _, data_dir = built_dataset
  config = ml_collections.ConfigDict(dict(
      dataset="image_folder", tfds_name="tiny_folder", data_dir=str(data_dir), split="train", image_size=16,
      channels=3, batch_size=num_good, random_flip=True, num_classes=3, num_workers=0, read_threads=2))
  info = input_pipeline.dataset_info(config)
  assert info["num_examples"] == num_good and info["class_names"] == ["cat", "dog", "zebra"]
  assert info["num_classes"] == 3 and info["image_size"] == 16
  with pytest.raises(ValueError, match="validation"):
    input_pipeline.dataset_info(ml_collections.ConfigDict(dict(config.to_dict(), split="validation")))
  batch = next(input_pipeline.create_train_iterator(config, seed=0, process_index=0, process_count=1))
  assert batch["image"].shape == (num_good, 16, 16, 3) and batch["image"].dtype == np.float32
  assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
  names = list(CLASS_COLOURS)
  for image, label in zip(batch["image"], batch["label"]):
    pixels = np.round((image + 1.0) * 127.5)
    if np.ptp(pixels) == 0 and pixels[0, 0, 0] == 200:  # the grey image, replicated to RGB
      assert names[label] == "zebra"
      continue
    dominant = int(np.argmax(pixels.reshape(-1, 3).mean(axis=0)))
    assert dominant == list(CLASS_COLOURS[names[label]]).index(220), (names[label], pixels[0, 0])


def test_build_with_image_size_stores_cropped_squares(tmp_path, built_dataset):
  root = built_dataset[3]
  with pytest.warns(UserWarning) as record:
    result = input_pipeline.build_image_folder_dataset(root, tmp_path, name="tiny_folder_8", image_size=8,
                                                       encoding_format="jpeg")
  assert any("broken.png" in str(warning.message) for warning in record)
  source = tfds_source.open_tfds_source("tiny_folder_8", "train", tmp_path)
  assert len(source) == result.num_examples
  assert {source[i]["image"].shape for i in range(len(source))} == {(8, 8, 3)}
  with pytest.raises(FileExistsError, match="overwrite"):
    input_pipeline.build_image_folder_dataset(root, tmp_path, name="tiny_folder_8")


def test_cli_builds(tmp_path):
  root = tmp_path / "images"
  (root / "a").mkdir(parents=True)
  (root / "b").mkdir()
  Image.new("RGB", (12, 10), (1, 2, 3)).save(root / "a" / "x.png")
  Image.new("RGB", (9, 14), (4, 5, 6)).save(root / "b" / "y.jpeg")
  code = input_pipeline.main(
      ["build", f"--image_root={root}", f"--data_dir={tmp_path / 'out'}", "--name=cli_set"])
  assert code == 0
  assert len(tfds_source.open_tfds_source("cli_set", "train", tmp_path / "out")) == 2


def test_empty_or_flat_folder_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="no class sub-folders"):
    input_pipeline.build_image_folder_dataset(tmp_path, tmp_path / "out")
  Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
  with pytest.raises(ValueError, match="no class sub-folders"):
    input_pipeline.build_image_folder_dataset(tmp_path, tmp_path / "out")
  (tmp_path / "empty_class").mkdir()
  with pytest.raises(ValueError, match="no image files"), pytest.warns(UserWarning, match="no image files"):
    input_pipeline.build_image_folder_dataset(tmp_path, tmp_path / "out")
  (tmp_path / "empty_class" / "bad.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="could be decoded"), pytest.warns(UserWarning, match="bad.jpg"):
    input_pipeline.build_image_folder_dataset(tmp_path, tmp_path / "out")
  with pytest.raises(ValueError, match="not a directory"):
    input_pipeline.build_image_folder_dataset(tmp_path / "missing", tmp_path / "out")


@pytest.mark.parametrize("dataset,tfds_name", [("image_folder", None), ("tfds", "mnist")])
def test_missing_dataset_names_path_and_build_command(tmp_path, dataset, tfds_name):
  config = ml_collections.ConfigDict(dict(
      dataset=dataset, tfds_name=tfds_name, data_dir=str(tmp_path / "nowhere"), image_size=16, channels=3,
      batch_size=2, num_classes=10))
  with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*python -m dig_jax.input_pipeline build"):
    input_pipeline.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  (tmp_path / "nowhere").mkdir()
  with pytest.raises(FileNotFoundError, match=r"No prepared TFDS dataset '(image_folder|mnist)'"):
    input_pipeline.dataset_info(config)
  assert not list((tmp_path / "nowhere").iterdir()), "a failed lookup must not create anything"
