"""Training input pipeline: grain over in-memory, synthetic or TFDS (array_record) sources; exact resume.

Public entry points:
- `create_train_iterator(input_config, *, seed, process_index=None, process_count=None) -> TrainIterator`:
  an infinite iterator of this process's batches `{"image": float32 [B/P, S, S, C] in [-1, 1],
  "label": int32 [B/P]}` with `get_state()` / `set_state()` for exact resume.
- `dataset_info(input_config) -> dict`: image_size, channels, num_classes, num_examples (+ dataset, split,
  class_names).
- `load_embedded_mnist(split)`, `build_image_folder_dataset(...)`, `adm_center_crop(...)` (re-exported).
- CLI: `python -m dig_jax.input_pipeline build --image_root=DIR --data_dir=DIR [--name=..] [--image_size=..]`.

input_config fields (an ml_collections.ConfigDict; missing optional fields take the defaults shown):
  dataset            "embedded_mnist" | "sklearn_digits" | "tfds" | "image_folder" | "synthetic"
  tfds_name          TFDS name for "tfds"; for "image_folder" the name given to the builder ("image_folder")
  data_dir           TFDS data_dir (None: $TFDS_DATA_DIR, else ~/tensorflow_datasets)
  split              "train"; embedded_mnist also has "test" (the fixed 500 held-out digits) and "all"
  image_size         square output side (32)
  channels           1 or 3 (default: 1 for the digit sets, 3 otherwise); grey is replicated, RGB -> luma
  batch_size         GLOBAL batch; must divide by the process count
  random_flip        horizontal flip with probability 1/2 (False)
  num_classes        label count; must be >= the dataset's class count
  num_workers        grain worker processes (0); resume needs the same value
  read_threads       grain read threads per process (0 for in-memory sets, 8 for TFDS)
  prefetch_buffer_size  elements prefetched per process (2 * local batch, at least 16)
  num_examples, data_seed  size and content seed of "synthetic" (10_000, 0)
  image_key, label_key     record keys for "tfds" ("image", "label"; label_key="" means all labels 0)

How the stream is built (grain's dataset API, nothing hand-rolled):
  MapDataset.source(src).seed(seed).shuffle().repeat(None)      # one global permutation per epoch, reseeded
    .map(decode/crop)  .random_map(flip) / .map(scale)          # per-element rng from (seed, global index)
    [process_index::process_count]                              # this process's share of the global stream
    .to_iter_dataset(ReadOptions).batch(B / P, drop_remainder)  # local batch
    [.mp_prefetch(num_workers)]
Step k's global batch is the global-stream elements [k*B, (k+1)*B), split across processes by index modulo P,
so the union over processes does not depend on the process count, and flips depend on the global index only.
grain's iterator state counts consumed elements (not prefetched ones), so `set_state` resumes exactly.
Resume requires the same seed, dataset, global batch, process count and worker count; `TrainIterator` stores
these in its state and refuses a mismatching one with a ValueError.

Deliberate deviations from the official DiG/DiT PyTorch loaders: a global grain shuffle with per-epoch reseed
instead of a DistributedSampler; unreadable images are skipped when the dataset is built, not at train time;
every process reads only its own slice and no sample is dropped at an epoch boundary (epochs blend into one
infinite stream).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

import grain
import numpy as np

from dig_jax.data import image_ops
from dig_jax.data import sources
from dig_jax.data import tfds_source
from dig_jax.data.image_folder import ImageFolderBuildResult, build_image_folder_dataset  # noqa: F401
from dig_jax.data.image_ops import adm_center_crop, to_model_range  # noqa: F401
from dig_jax.data.sources import load_embedded_mnist, load_sklearn_digits  # noqa: F401

# Dataset kinds. "latent" is the seam for SD-VAE latent datasets (not implemented yet).
DATASET_KINDS = ("embedded_mnist", "sklearn_digits", "tfds", "image_folder", "synthetic")
LATENT_DATASET_KIND = "latent"
DEFAULT_IMAGE_FOLDER_NAME = "image_folder"
_IN_MEMORY_KINDS = ("embedded_mnist", "sklearn_digits", "synthetic")
_STATE_VERSION = 1


def _get(config: Any, name: str, default: Any = None) -> Any:
  value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
  return default if value is None else value


def _check_kind(config: Any) -> str:
  kind = _get(config, "dataset")
  if kind == LATENT_DATASET_KIND:
    raise NotImplementedError(
        "dataset='latent' (precomputed SD-VAE latents) is not implemented yet. Planned: an array_record TFDS "
        "dataset with a Tensor 'latent' feature read through the 'tfds' path, with a latent-space flip. "
        "Until then use a pixel-space dataset: " + ", ".join(DATASET_KINDS))
  if kind not in DATASET_KINDS:
    raise ValueError(f"unknown input_config.dataset {kind!r}; valid: {', '.join(DATASET_KINDS)} "
                     f"('{LATENT_DATASET_KIND}' is reserved for VAE latents, not implemented yet).")
  return kind


def _default_channels(kind: str) -> int:
  return 1 if kind in ("embedded_mnist", "sklearn_digits") else 3


def _geometry(config: Any, kind: str) -> tuple[int, int]:
  image_size = int(_get(config, "image_size", 32))
  channels = int(_get(config, "channels", _default_channels(kind)))
  if image_size <= 0:
    raise ValueError(f"input_config.image_size must be positive, got {image_size}")
  if channels not in (1, 3):
    raise ValueError(f"input_config.channels must be 1 or 3, got {channels}")
  return image_size, channels


def _tfds_name(config: Any, kind: str) -> str:
  if kind == "image_folder":
    return _get(config, "tfds_name", "") or DEFAULT_IMAGE_FOLDER_NAME
  return _get(config, "tfds_name", "")


_RecordFn = Callable[[dict[str, Any]], dict[str, Any]]


def _open_source(config: Any) -> tuple[Any, _RecordFn | None, dict[str, Any]]:
  """(random-access source, per-record decode fn or None, info dict) for the configured dataset."""
  kind = _check_kind(config)
  image_size, channels = _geometry(config, kind)
  split = _get(config, "split", "train")
  info: dict[str, Any] = {"dataset": kind, "split": split, "image_size": image_size, "channels": channels}
  decode = None
  if kind == "embedded_mnist":
    images, labels = load_embedded_mnist(split, image_size=image_size, channels=channels)
    source = sources.ArraySource(images, labels, name=f"embedded_mnist/{split}")
    info.update(source_num_classes=sources.NUM_DIGIT_CLASSES, class_names=[str(d) for d in range(10)])
  elif kind == "sklearn_digits":
    images, labels = load_sklearn_digits(split, image_size=image_size, channels=channels)
    source = sources.ArraySource(images, labels, name=f"sklearn_digits/{split}")
    info.update(source_num_classes=sources.NUM_DIGIT_CLASSES, class_names=[str(d) for d in range(10)])
  elif kind == "synthetic":
    num_classes = int(_get(config, "num_classes", 10))
    source = sources.SyntheticSource(num_examples=int(_get(config, "num_examples", 10_000)),
                                     image_size=image_size, channels=channels, num_classes=num_classes,
                                     data_seed=int(_get(config, "data_seed", 0)))
    info.update(source_num_classes=num_classes, class_names=None)
  else:  # "tfds" and "image_folder" (an image folder built into array_record by the CLI).
    name = _tfds_name(config, kind)
    label_key = _get(config, "label_key", "label") or None
    source = tfds_source.open_tfds_source(name, split, _get(config, "data_dir"))
    decode = tfds_source.TfdsRecordToExample(
        image_size=image_size, channels=channels, image_key=_get(config, "image_key", "image"),
        label_key=label_key)
    class_names = tfds_source.tfds_class_names(source, label_key)
    info.update(tfds_name=name, class_names=class_names,
                source_num_classes=len(class_names) if class_names else None)
  info["num_examples"] = len(source)
  configured_classes = _get(config, "num_classes")
  source_classes = info.pop("source_num_classes")
  if None not in (configured_classes, source_classes) and source_classes > int(configured_classes):
    raise ValueError(f"dataset {kind!r} has {source_classes} classes but input_config.num_classes is "
                     f"{configured_classes}; set num_classes >= {source_classes}.")
  info["num_classes"] = int(configured_classes) if configured_classes is not None else source_classes
  if len(source) == 0:
    raise ValueError(f"dataset {kind!r} split {split!r} is empty.")
  return source, decode, info


def dataset_info(input_config: Any) -> dict[str, Any]:
  """{"dataset", "split", "image_size", "channels", "num_classes", "num_examples", "class_names", ...}."""
  _, _, info = _open_source(input_config)
  return info


class _RandomFlipAndScale(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2 (rng from grain: seed + element index), then uint8 -> [-1, 1]."""

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = element["image"]
    if rng.random() < 0.5:
      image = image[:, ::-1]
    return {"image": image_ops.to_model_range(image), "label": np.int32(element["label"])}


class _Scale(grain.transforms.Map):
  """uint8 -> [-1, 1] without augmentation."""

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return {"image": image_ops.to_model_range(element["image"]), "label": np.int32(element["label"])}


def _resolve_processes(global_batch: int, process_index: int | None,
                       process_count: int | None) -> tuple[int, int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only when the caller did not say)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f"input_config.batch_size (the GLOBAL batch) = {global_batch} must be a positive "
                     f"multiple of process_count = {process_count}; each process reads "
                     "batch_size / process_count.")
  return process_index, process_count, global_batch // process_count


class TrainIterator(grain.DatasetIterator):
  """Infinite iterator over this process's batches, with JSON-serialisable get_state / set_state.

  A `grain.DatasetIterator`, so `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` work inside an
  orbax Composite as well as the plain `get_state()` / `set_state()` dicts. The state carries a fingerprint of
  everything that must match for an exact resume.
  """

  def __init__(self, grain_iterator: grain.DatasetIterator, *, fingerprint: dict[str, Any],
               info: dict[str, Any], local_batch_size: int):
    super().__init__(grain_iterator)
    self.fingerprint = fingerprint
    self.info = info
    self.local_batch_size = local_batch_size

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"version": _STATE_VERSION, "fingerprint": dict(self.fingerprint),
            "grain": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "grain" not in state or "fingerprint" not in state:
      raise ValueError("not a TrainIterator state (expected keys 'version', 'fingerprint', 'grain'); got "
                       f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    saved = state["fingerprint"]
    mismatched = {key: (saved.get(key), value) for key, value in self.fingerprint.items()
                  if saved.get(key) != value}
    if mismatched:
      details = "; ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in mismatched.items())
      raise ValueError(f"cannot resume the input pipeline exactly, the set-up changed ({details}). "
                       "Resume with the same data config, seed, process count and num_workers.")
    self._parent.set_state(state["grain"])

  def __str__(self) -> str:
    return f"TrainIterator({self.fingerprint})"


def create_train_iterator(input_config: Any, *, seed: int, process_index: int | None = None,
                          process_count: int | None = None) -> TrainIterator:
  """Infinite, seeded, resumable iterator over this process's share of each global batch (see module doc)."""
  if int(seed) < 0:
    raise ValueError(f"seed must be a non-negative integer (grain requirement), got {seed}")
  global_batch = int(_get(input_config, "batch_size", 0))
  process_index, process_count, local_batch = _resolve_processes(global_batch, process_index, process_count)
  source, decode, info = _open_source(input_config)
  kind = info["dataset"]
  num_workers = int(_get(input_config, "num_workers", 0))
  if num_workers < 0:
    raise ValueError(f"input_config.num_workers must be >= 0, got {num_workers}")
  random_flip = bool(_get(input_config, "random_flip", False))

  dataset = grain.MapDataset.source(source).seed(int(seed)).shuffle().repeat(None)
  if decode is not None:
    dataset = dataset.map(decode)
  dataset = dataset.random_map(_RandomFlipAndScale()) if random_flip else dataset.map(_Scale())
  dataset = dataset[process_index::process_count]
  default_threads = 0 if kind in _IN_MEMORY_KINDS else 8
  read_options = grain.ReadOptions(
      num_threads=int(_get(input_config, "read_threads", default_threads)),
      prefetch_buffer_size=int(_get(input_config, "prefetch_buffer_size", max(2 * local_batch, 16))))
  iter_dataset = dataset.to_iter_dataset(read_options).batch(local_batch, drop_remainder=True)
  if num_workers > 0:
    _mark_absl_flags_parsed()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))

  fingerprint = {
      "dataset": kind, "split": info["split"], "tfds_name": info.get("tfds_name", ""),
      "num_examples": info["num_examples"], "image_size": info["image_size"], "channels": info["channels"],
      "random_flip": random_flip, "seed": int(seed), "global_batch_size": global_batch,
      "process_index": process_index, "process_count": process_count, "num_workers": num_workers,
  }
  info = dict(info, global_batch_size=global_batch, local_batch_size=local_batch,
              process_index=process_index, process_count=process_count)
  return TrainIterator(iter(iter_dataset), fingerprint=fingerprint, info=info, local_batch_size=local_batch)


def _mark_absl_flags_parsed() -> None:
  """grain worker processes read absl flags; outside absl.app.run they would raise UnparsedFlagAccessError."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m dig_jax.input_pipeline",
                                   description="Data preparation for dig-jax (no network, no TensorFlow).")
  commands = parser.add_subparsers(dest="command", required=True)
  build = commands.add_parser(
      "build", help="image folder (one sub-folder per class) -> array_record TFDS dataset")
  build.add_argument("--image_root", required=True, help="folder with one sub-folder of images per class")
  build.add_argument("--data_dir", required=True, help="TFDS data_dir to write the dataset into")
  build.add_argument("--name", default=DEFAULT_IMAGE_FOLDER_NAME, help="dataset name (snake_case)")
  build.add_argument("--image_size", type=int, default=None,
                     help="store ADM-centre-cropped squares of this size (default: full-size images)")
  build.add_argument("--encoding_format", choices=("png", "jpeg"), default="png")
  build.add_argument("--overwrite", action="store_true", help="replace an existing build")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  result = build_image_folder_dataset(args.image_root, args.data_dir, name=args.name,
                                      image_size=args.image_size, encoding_format=args.encoding_format,
                                      overwrite=args.overwrite)
  print(f"built '{result.name}' at {result.dataset_dir}: {result.num_examples} images, "
        f"{len(result.class_names)} classes, {len(result.skipped_files)} unreadable file(s) skipped.\n"
        f"Train with: dataset='image_folder' (or 'tfds'), tfds_name='{result.name}', "
        f"data_dir='{result.data_dir}'")
  return 0


if __name__ == "__main__":
  sys.exit(main())
