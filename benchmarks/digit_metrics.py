"""Digit-quality metrics for the MNIST demo: a small JAX/optax CNN classifier and a Fréchet distance.

Why built this way: the demo trains on the 4,500 embedded real MNIST digits, so the natural judge of its
samples is a classifier trained on exactly those digits (no Inception network, no download). The
classifier gives two numbers:
  * class accuracy of generated digits (label = the class that was requested from the model), and
  * an FID-like Fréchet distance computed in the classifier's penultimate feature space (128-d), between
    generated digits and the 500 held-out real test digits. The 4,500 real training digits vs those 500 give
    the floor (what a perfect generator of MNIST-like digits would score with these sample sizes).

The classifier is a LeNet-style CNN (two 3x3 conv blocks + a 128-unit dense layer) trained with Adam on
random +-2 pixel shifts of the training digits; it reaches ~99 % on the 500 held-out digits in well under a
minute on 2 CPU cores. The Fréchet distance is computed in float64 NumPy; the trace of the matrix square root
``tr((S1 S2)^(1/2))`` is taken as ``sum(sqrt(eig(A S2 A)))`` with ``A = S1^(1/2)`` from a symmetric
eigendecomposition, which is exact for PSD matrices and needs no scipy (the usual ``scipy.linalg.sqrtm``
route can return complex noise for near-singular covariances).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

FEATURE_DIM = 128


# ----------------------------------------------------------------------------------------------- Fréchet.

def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric PSD square root by eigendecomposition (negative round-off eigenvalues clipped to 0)."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                                sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
    raise ValueError(f"Mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                     f"{sigma2.shape}.")
  root1 = _psd_sqrt(sigma1)
  inner = root1 @ sigma2 @ root1
  trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance with N-1) of [N, D] features, float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D]; got {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to two [N, D] feature sets."""
  return frechet_distance_from_stats(*feature_stats(features1), *feature_stats(features2))


# ----------------------------------------------------------------------------------------------- classifier.

def _init_params(rng: jax.Array) -> dict[str, Any]:
  keys = jax.random.split(rng, 4)
  he = lambda k, shape, fan_in: jax.random.normal(k, shape, jnp.float32) * np.sqrt(2.0 / fan_in)
  return {
      "conv1": {"w": he(keys[0], (3, 3, 1, 32), 9), "b": jnp.zeros((32,))},
      "conv2": {"w": he(keys[1], (3, 3, 32, 64), 9 * 32), "b": jnp.zeros((64,))},
      "dense": {"w": he(keys[2], (8 * 8 * 64, FEATURE_DIM), 8 * 8 * 64), "b": jnp.zeros((FEATURE_DIM,))},
      "out": {"w": he(keys[3], (FEATURE_DIM, 10), FEATURE_DIM) * 0.5, "b": jnp.zeros((10,))},
  }


def _conv_pool(x: jax.Array, layer: dict[str, jax.Array]) -> jax.Array:
  x = jax.lax.conv_general_dilated(x, layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = jax.nn.relu(x + layer["b"])
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _forward(params: dict[str, Any], images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """images float32 [N, 32, 32, 1] in [-1, 1] -> (logits [N, 10], penultimate features [N, 128])."""
  x = _conv_pool(images, params["conv1"])
  x = _conv_pool(x, params["conv2"])
  features = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["dense"]["w"] + params["dense"]["b"])
  return features @ params["out"]["w"] + params["out"]["b"], features


def _to_float(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1:] != (32, 32, 1):
    raise ValueError(f"Digit images must be [N, 32, 32, 1] (or [N, 32, 32]); got {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"Digit images must be uint8 in [0, 255]; got {images.dtype}")
  return images.astype(np.float32) / 127.5 - 1.0


def _random_shift(rng: np.random.Generator, batch: np.ndarray, max_shift: int = 2) -> np.ndarray:
  """Shifts each image by up to +-max_shift pixels (background -1 fills the gap)."""
  padded = np.pad(batch, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                  constant_values=-1.0)
  dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, len(batch)))
  return np.stack([p[y:y + 32, x:x + 32] for p, y, x in zip(padded, dy, dx)])


@dataclasses.dataclass
class DigitClassifier:
  """A trained classifier: `predict` labels, `features` (penultimate, 128-d)."""
  params: dict[str, Any]
  train_seconds: float = 0.0

  def _apply(self, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    x = _to_float(images)
    logits, features = [], []
    for start in range(0, len(x), batch_size):
      lo, fe = _jit_forward(self.params, jnp.asarray(x[start:start + batch_size]))
      logits.append(np.asarray(lo))
      features.append(np.asarray(fe))
    return np.concatenate(logits), np.concatenate(features)

  def predict(self, images: np.ndarray) -> np.ndarray:
    return self._apply(images)[0].argmax(axis=-1).astype(np.int32)

  def features(self, images: np.ndarray) -> np.ndarray:
    return self._apply(images)[1]

  def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(self.predict(images) == np.asarray(labels)))

  def save(self, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    flat = {f"{layer}/{name}": np.asarray(v) for layer, d in self.params.items() for name, v in d.items()}
    np.savez(path, train_seconds=np.float64(self.train_seconds), **flat)

  @classmethod
  def load(cls, path: str) -> "DigitClassifier":
    with np.load(path) as data:
      params: dict[str, dict[str, jax.Array]] = {}
      for key in data.files:
        if key == "train_seconds":
          continue
        layer, name = key.split("/")
        params.setdefault(layer, {})[name] = jnp.asarray(data[key])
      train_seconds = float(data["train_seconds"]) if "train_seconds" in data.files else 0.0
    return cls(params, train_seconds)


_jit_forward = jax.jit(_forward)


def train_classifier(images: np.ndarray, labels: np.ndarray, *, epochs: int = 12, batch_size: int = 64,
                     learning_rate: float = 2e-3, seed: int = 0) -> DigitClassifier:
  """Trains the CNN on uint8 [N, 32, 32, 1] digits with shift augmentation; cosine-decayed Adam."""
  x, y = _to_float(images), np.asarray(labels, np.int32)
  steps_per_epoch = len(x) // batch_size
  schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch)
  tx = optax.adam(schedule)
  params = _init_params(jax.random.key(seed))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss_fn(p):
      logits, _ = _forward(p, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  t0 = time.time()
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      batch = jnp.asarray(_random_shift(rng, x[idx]))
      params, opt_state, _ = step(params, opt_state, batch, jnp.asarray(y[idx]))
  jax.block_until_ready(params)
  return DigitClassifier(params, train_seconds=time.time() - t0)


def load_or_train_classifier(cache_path: str | None, train_images: np.ndarray, train_labels: np.ndarray,
                             **kwargs: Any) -> DigitClassifier:
  """The cached classifier at `cache_path` if it exists, else a freshly trained one (saved there)."""
  if cache_path and os.path.exists(cache_path):
    return DigitClassifier.load(cache_path)
  classifier = train_classifier(train_images, train_labels, **kwargs)
  if cache_path:
    classifier.save(cache_path)
  return classifier


def score_samples(classifier: DigitClassifier, samples: np.ndarray, requested_labels: np.ndarray,
                  reference_images: np.ndarray) -> dict[str, Any]:
  """Class accuracy (per class too) of generated digits and their Fréchet distance to the reference set."""
  logits, features = classifier._apply(samples)  # pylint: disable=protected-access
  predicted = logits.argmax(axis=-1)
  requested = np.asarray(requested_labels)
  per_class = {int(c): float(np.mean(predicted[requested == c] == c)) for c in np.unique(requested)}
  return {"class_accuracy": float(np.mean(predicted == requested)), "per_class_accuracy": per_class,
          "fid_vs_test": frechet_distance(features, classifier.features(reference_images)),
          "num_samples": int(len(samples))}
