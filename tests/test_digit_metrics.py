"""Tests of the Fréchet distance in benchmarks/digit_metrics.py against closed forms (NumPy only, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import digit_metrics


def test_identical_sets_give_zero():
  features = np.random.default_rng(0).normal(size=(400, 16))
  assert digit_metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_shifted_gaussians_match_closed_form():
  # Same covariance, shifted means: the distance is exactly ||mu1 - mu2||^2 (the trace terms cancel).
  rng = np.random.default_rng(1)
  a = rng.normal(size=(16, 16))
  sigma = a @ a.T / 16 + 0.1 * np.eye(16)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  expected = float(np.sum((mu1 - mu2) ** 2))
  got = digit_metrics.frechet_distance_from_stats(mu1, sigma, mu2, sigma)
  assert got == pytest.approx(expected, rel=1e-9)


def test_diagonal_covariances_match_closed_form():
  # Diagonal S1, S2: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (s1^0.5 - s2^0.5)^2.
  rng = np.random.default_rng(2)
  s1, s2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2))
  got = digit_metrics.frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expected, rel=1e-9)


def test_sampled_shifted_gaussians_approach_closed_form():
  # Finite samples of N(0, I) and N(d, 4 I) in 4-d: distance ~ ||d||^2 + 4 * (1 - 2)^2.
  rng = np.random.default_rng(3)
  shift = np.array([1.0, -2.0, 0.5, 0.0])
  x = rng.normal(size=(20000, 4))
  y = 2.0 * rng.normal(size=(20000, 4)) + shift
  expected = float(shift @ shift + 4.0)
  assert digit_metrics.frechet_distance(x, y) == pytest.approx(expected, rel=0.03)


def test_non_commuting_covariances_match_scipy_free_reference():
  # tr sqrt(S1 S2) via the eigenvalues of S1 S2 (real, non-negative for PSD S1, S2): an independent route.
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
  s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
  trace_sqrt = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
  expected = float(np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)
  zeros = np.zeros(6)
  assert digit_metrics.frechet_distance_from_stats(zeros, s1, zeros, s2) == pytest.approx(expected, rel=1e-8)


def test_mismatched_shapes_raise():
  with pytest.raises(ValueError, match="Mismatched"):
    digit_metrics.frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_classifier_save_load_round_trip(tmp_path):
  """A cached classifier loads back with its parameters and train time (a closed-file bug once broke it)."""
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": rng.standard_normal((3, 2)).astype(np.float32),
                      "bias": rng.standard_normal(2).astype(np.float32)}}
  path = str(tmp_path / "clf.npz")
  digit_metrics.DigitClassifier(params, train_seconds=12.5).save(path)
  loaded = digit_metrics.DigitClassifier.load(path)
  assert loaded.train_seconds == 12.5
  for name, value in params["dense"].items():
    np.testing.assert_array_equal(np.asarray(loaded.params["dense"][name]), value)
