"""Shared helpers for the GLA tests: random inputs with log-uniform gates, a float64 oracle, an H100 target."""
from __future__ import annotations

import os

import numpy as np
import pytest


def fresh_rng() -> tuple[np.random.Generator, int]:
  """A new generator per test run (fresh inputs every run); the seed goes into assertion messages and
  GLA_TEST_SEED=<seed> in the environment replays it."""
  seed = int(os.environ.get("GLA_TEST_SEED") or np.random.SeedSequence().entropy % (2**31))
  return np.random.default_rng(seed), seed


def random_inputs(rng: np.random.Generator, b: int, t: int, h: int, dk: int, dv: int,
                  gate_min: float = 1e-3, gate_max: float = 10.0):
  """q, k, v ~ N(0, 1) and log gates -|g| with |g| log-uniform in [gate_min, gate_max] per step (float32)."""
  q = rng.standard_normal((b, t, h, dk)).astype(np.float32)
  k = rng.standard_normal((b, t, h, dk)).astype(np.float32)
  v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
  g = -np.exp(rng.uniform(np.log(gate_min), np.log(gate_max), (b, t, h, dk))).astype(np.float32)
  return q, k, v, g


def numpy_gla(q, k, v, g, scale=None, initial_state=None):
  """Token-by-token GLA in float64: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  b, t, h, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  state = np.zeros((b, h, dk, v.shape[-1])) if initial_state is None else np.array(initial_state, np.float64)
  out = np.zeros(v.shape)
  for step in range(t):
    state = state * np.exp(g[:, step])[..., None] + k[:, step, :, :, None] * v[:, step, :, None, :]
    out[:, step] = scale * np.einsum("bhk,bhkv->bhv", q[:, step], state)
  return out, state


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "non-finite values"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def target_h100_for_triton_lowering(monkeypatch) -> None:
  """Makes Pallas-Triton lower for an H100 without a GPU (private gpu_info API; skips the test if it moved)."""
  gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
  if not hasattr(gpu_info, "_get_gpu_info_impl") or not hasattr(gpu_info, "GpuVersion"):
    pytest.skip("private Pallas-Triton gpu_info API changed")
  monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100))
