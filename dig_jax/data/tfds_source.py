"""Read prepared TFDS datasets (array_record) as random-access sources; no TensorFlow, never downloads.

`tfds.data_source` returns an `ArrayRecordDataSource` whose records are NumPy dicts (images decoded with PIL);
grain reads it directly. TensorFlow is not needed and not used: `tfds.load` / `as_dataset` / tfrecord all need
TF, so datasets must be prepared with `file_format="array_record"` (our image-folder builder does that).

Network safety: GCS access is switched off in tfds itself, and `try_gcs=False` / `download=False` are passed.
A missing dataset is detected *before* calling tfds (tfds' own messages for an unprepared catalogue dataset
are misleading, e.g. "tfrecord not supported"), and reported with the path and the command that builds it.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from dig_jax.data import image_ops

DEFAULT_TFDS_DATA_DIR = os.path.join("~", "tensorflow_datasets")


def import_tfds_offline() -> Any:
  """Imports tensorflow_datasets with GCS access disabled (no network is ever attempted)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (0.4 s import, optional path)
  from tensorflow_datasets.core.utils import gcs_utils  # pylint: disable=g-import-not-at-top
  gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access
  tfds.disable_progress_bar()
  return tfds


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> pathlib.Path:
  """data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (the tfds default), as an absolute path."""
  chosen = data_dir or os.environ.get("TFDS_DATA_DIR") or DEFAULT_TFDS_DATA_DIR
  return pathlib.Path(os.path.expanduser(os.fspath(chosen))).absolute()


def build_command_hint(name: str, data_dir: pathlib.Path) -> str:
  return (f"Build it from a folder of class sub-folders with\n"
          f"  python -m dig_jax.input_pipeline build --image_root=/path/to/images --data_dir={data_dir} "
          f"--name={name}\n"
          "or prepare a catalogue dataset on a machine with network access using tfds "
          "(download_and_prepare with file_format='array_record') and copy its folder there.")


def _dataset_folder(tfds_name: str, data_dir: pathlib.Path) -> pathlib.Path:
  # "name", "name/config", "name:1.0.0" and "name/config:1.0.0" all live under data_dir/name[/config].
  return data_dir / tfds_name.split(":", 1)[0]


def check_prepared(tfds_name: str, data_dir: pathlib.Path) -> None:
  """Raises FileNotFoundError (with the fix) unless a prepared dataset exists under data_dir."""
  if not data_dir.is_dir():
    raise FileNotFoundError(f"TFDS data_dir {data_dir} does not exist, so dataset '{tfds_name}' cannot be "
                            "read. " + build_command_hint(tfds_name, data_dir))
  folder = _dataset_folder(tfds_name, data_dir)
  infos = list(folder.glob("dataset_info.json")) + list(folder.glob("*/dataset_info.json")) + list(
      folder.glob("*/*/dataset_info.json"))
  if not infos:
    raise FileNotFoundError(f"No prepared TFDS dataset '{tfds_name}' under {folder} (no dataset_info.json). "
                            + build_command_hint(tfds_name, data_dir))


def open_tfds_source(tfds_name: str, split: str, data_dir: str | os.PathLike[str] | None) -> Any:
  """`tfds.data_source` for a prepared array_record dataset; clear errors for every way it can be missing."""
  if not tfds_name:
    raise ValueError("input_config.tfds_name must name the TFDS dataset to read (e.g. 'imagenet2012').")
  resolved = resolve_data_dir(data_dir)
  check_prepared(tfds_name, resolved)
  tfds = import_tfds_offline()
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=os.fspath(resolved), try_gcs=False,
                            download=False)
  except NotImplementedError as error:  # Prepared as tfrecord: random access needs array_record.
    raise ValueError(f"TFDS dataset '{tfds_name}' under {resolved} is not in array_record format, which "
                     "random access (grain) needs. Re-prepare it with file_format='array_record'. "
                     f"tfds said: {error}") from error
  except (tfds.core.registered.DatasetNotFoundError, AssertionError, FileNotFoundError) as error:
    raise FileNotFoundError(f"Could not open TFDS dataset '{tfds_name}' split '{split}' under {resolved}: "
                            f"{error}\n" + build_command_hint(tfds_name, resolved)) from error
  except ValueError as error:  # Typically an unknown split name.
    raise ValueError(f"Could not open split '{split}' of TFDS dataset '{tfds_name}' under {resolved}: "
                     f"{error}") from error


def tfds_class_names(source: Any, label_key: str | None) -> list[str] | None:
  """The ClassLabel names of a tfds data source's label feature, or None if there is none."""
  if label_key is None:
    return None
  try:
    feature = source.dataset_info.features[label_key]
  except (AttributeError, KeyError):
    return None
  names = getattr(feature, "names", None)
  return list(names) if names else None


class TfdsRecordToExample:
  """Maps a decoded tfds record to {"image": uint8 [S, S, C], "label": int32} with the ADM centre crop.

  A module-level class (not a lambda) so that grain worker processes can pickle it.
  """

  def __init__(self, *, image_size: int, channels: int, image_key: str = "image",
               label_key: str | None = "label"):
    self.image_size = image_size
    self.channels = channels
    self.image_key = image_key
    self.label_key = label_key

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(record[self.image_key])
    if image.dtype != np.uint8:
      raise ValueError(f"expected uint8 images under '{self.image_key}', got {image.dtype}")
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] > self.channels:  # Reduce channels before the crop, expand after it.
      image = image_ops.match_channels(image, self.channels)
    if image.shape[0] != self.image_size or image.shape[1] != self.image_size:
      image = image_ops.adm_center_crop(image, self.image_size)
    image = image_ops.match_channels(image, self.channels)
    label = np.int32(record[self.label_key]) if self.label_key else np.int32(0)
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return (f"TfdsRecordToExample(image_size={self.image_size}, channels={self.channels}, "
            f"image_key={self.image_key!r}, label_key={self.label_key!r})")
