"""Build an array_record TFDS dataset from an ImageNet-style folder (one sub-folder per class).

Why a custom builder instead of `tfds.ImageFolder`: `tfds.ImageFolder`, tfrecord output, `tfds.load` and numpy
inputs to `tfds.features.Image` all need TensorFlow, which the project does not install. A
`GeneratorBasedBuilder` writing `file_format="array_record"` works without TF as long as images are handed to
the `Image` feature as encoded bytes (we encode with PIL ourselves). `DatasetInfo` is constructed directly,
because `dataset_info_from_configs` reads README/CITATIONS files next to the builder module.

The builder class is created per call with the requested dataset name and is never put in tfds' registry, so
several builds (different names, or tests) in one process do not collide. The result is read back with
`tfds.data_source(name, data_dir=...)`, which finds unregistered datasets from their files.

Behaviour:
- classes are the sorted names of the non-hidden sub-folders; labels are their indices;
- files are taken by extension (png, jpg, jpeg, bmp, gif, webp, tif, tiff, ppm, pgm; any case); other files
  are ignored;
- an image that PIL cannot decode is skipped with a warning naming the file; the build continues and a final
  warning gives the count;
- images are converted to RGB; with `image_size` they are ADM-centre-cropped at build time (the usual way to
  store ImageNet-256), otherwise stored at full size and cropped when read;
- an empty folder, a folder without class sub-folders or without any image file raises ValueError.
Deliberate deviation from torchvision's ImageFolder (used by the official DiG/DiT code): unreadable files are
skipped instead of crashing the data loader mid-training; EXIF orientation is ignored there and here.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pathlib
import re
import shutil
import types
import warnings
from typing import Any, Iterator

import numpy as np
from PIL import Image

from dig_jax.data import image_ops
from dig_jax.data import tfds_source

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
BUILDER_VERSION = "1.0.0"
_DATASET_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
_JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class ImageFolderBuildResult:
  """What `build_image_folder_dataset` wrote."""
  name: str
  data_dir: str
  dataset_dir: str
  class_names: tuple[str, ...]
  num_examples: int
  skipped_files: tuple[str, ...]


def list_image_folder(image_root: str | os.PathLike[str]) -> tuple[list[str], list[tuple[pathlib.Path, int]]]:
  """(sorted class names, [(file, label)]) of an image folder; ValueError if it has no classes or images."""
  root = pathlib.Path(image_root).expanduser()
  if not root.is_dir():
    raise ValueError(f"image_root {root} is not a directory; expected a folder with one sub-folder per "
                     "class.")
  class_dirs = sorted((path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")),
                      key=lambda path: path.name)
  if not class_dirs:
    raise ValueError(f"image_root {root} has no class sub-folders; expected ImageNet-style layout "
                     "root/<class_name>/<image files>.")
  files: list[tuple[pathlib.Path, int]] = []
  for label, class_dir in enumerate(class_dirs):
    class_files = sorted(path for path in class_dir.rglob("*")
                         if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)
    if not class_files:
      warnings.warn(f"class folder {class_dir} contains no image files; its class stays in the label list.")
    files.extend((path, label) for path in class_files)
  if not files:
    raise ValueError(f"image_root {root} has class sub-folders but no image files with extensions "
                     f"{sorted(IMAGE_EXTENSIONS)}.")
  return [path.name for path in class_dirs], files


def _encode_image(path: pathlib.Path, image_size: int | None, encoding_format: str) -> bytes:
  """Decodes (fully, so corrupt files fail here), converts to RGB, optionally crops, re-encodes."""
  with Image.open(path) as opened:
    opened.load()
    image = opened.convert("RGB")
  if image_size is not None:
    image = Image.fromarray(image_ops.adm_center_crop(image, image_size))
  buffer = io.BytesIO()
  if encoding_format == "jpeg":
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  else:
    image.save(buffer, format="PNG")
  return buffer.getvalue()


def _make_builder_class(name: str) -> type:
  tfds = tfds_source.import_tfds_offline()

  class _ImageFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Array_record builder over a class-per-folder image tree (see module docstring)."""
    VERSION = tfds.core.Version(BUILDER_VERSION)
    RELEASE_NOTES = {BUILDER_VERSION: "Built by dig_jax.input_pipeline from a local image folder."}

    def __init__(self, *, image_root: pathlib.Path, class_names: list[str],
                 files: list[tuple[pathlib.Path, int]], image_size: int | None, encoding_format: str,
                 **kwargs: Any):
      self._image_root = image_root
      self._class_names = class_names
      self._files = files
      self._image_size = image_size
      self._encoding_format = encoding_format
      self.skipped_files: list[str] = []
      super().__init__(**kwargs)

    def _info(self) -> Any:
      side = self._image_size
      features = tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(side, side, 3), dtype=np.uint8,
                                       encoding_format=self._encoding_format),
          "label": tfds.features.ClassLabel(names=self._class_names),
      })
      return tfds.core.DatasetInfo(builder=self, description=f"Image folder {self._image_root}",
                                   features=features, supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
      for path, label in self._files:
        try:
          encoded = _encode_image(path, self._image_size, self._encoding_format)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
          self.skipped_files.append(str(path))
          message = f"skipping unreadable image {path}: {type(error).__name__}: {error}"
          logging.warning(message)
          warnings.warn(message)
          continue
        yield path.relative_to(self._image_root).as_posix(), {"image": encoded, "label": label}

  return types.new_class(f"ImageFolderBuilder_{name}", (_ImageFolderBuilder,), {"skip_registration": True},
                         lambda namespace: namespace.update({"name": name}))


def build_image_folder_dataset(image_root: str | os.PathLike[str], data_dir: str | os.PathLike[str], *,
                               name: str = "image_folder", image_size: int | None = None,
                               encoding_format: str = "png",
                               overwrite: bool = False) -> ImageFolderBuildResult:
  """Writes `data_dir/name/1.0.0/` (array_record, split "train") from `image_root/<class>/<images>`.

  Args:
    image_root: folder with one sub-folder per class.
    data_dir: TFDS data_dir to write into (read it back with dataset="tfds" or "image_folder",
      tfds_name=name).
    name: dataset name (lower-case snake_case).
    image_size: if set, store ADM-centre-cropped image_size x image_size images; else full-size images.
    encoding_format: "png" (lossless, default) or "jpeg" (quality 95, much smaller for photos).
    overwrite: replace an existing build of the same name and version instead of raising FileExistsError.

  Returns:
    An ImageFolderBuildResult with the class names, number of examples written and skipped files.
  """
  if not _DATASET_NAME_PATTERN.match(name):
    raise ValueError(f"dataset name must be lower-case snake_case (e.g. 'my_images'), got {name!r}")
  if encoding_format not in ("png", "jpeg"):
    raise ValueError(f"encoding_format must be 'png' or 'jpeg', got {encoding_format!r}")
  if image_size is not None and image_size <= 0:
    raise ValueError(f"image_size must be positive or None, got {image_size}")
  root = pathlib.Path(image_root).expanduser().absolute()
  class_names, files = list_image_folder(root)
  out_dir = tfds_source.resolve_data_dir(data_dir)
  dataset_dir = out_dir / name / BUILDER_VERSION
  if dataset_dir.exists():
    if not overwrite:
      raise FileExistsError(f"{dataset_dir} already exists; pass overwrite=True (CLI: --overwrite) to "
                            "rebuild it, or choose another --name.")
    shutil.rmtree(dataset_dir)
  out_dir.mkdir(parents=True, exist_ok=True)

  tfds = tfds_source.import_tfds_offline()
  builder = _make_builder_class(name)(image_root=root, class_names=class_names, files=files,
                                      image_size=image_size, encoding_format=encoding_format,
                                      data_dir=os.fspath(out_dir), file_format="array_record")
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except AssertionError as error:  # tfds: "No examples were yielded" when every file was unreadable.
    if len(builder.skipped_files) == len(files):
      raise ValueError(f"none of the {len(files)} image files under {root} could be decoded; nothing was "
                       "built.") from error
    raise
  skipped = tuple(builder.skipped_files)
  if skipped:
    summary = f"skipped {len(skipped)} unreadable image(s) of {len(files)} while building '{name}'"
    logging.warning(summary)
    warnings.warn(summary)
  num_examples = len(files) - len(skipped)
  return ImageFolderBuildResult(name=name, data_dir=os.fspath(out_dir), dataset_dir=os.fspath(dataset_dir),
                                class_names=tuple(class_names), num_examples=num_examples,
                                skipped_files=skipped)
