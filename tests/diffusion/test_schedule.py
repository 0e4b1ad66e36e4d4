"""Schedule values, respacing and the respaced timestep map of the DiT diffusion."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dig_jax.diffusion import create_diffusion
from dig_jax.diffusion import get_named_beta_schedule
from dig_jax.diffusion import sample_timesteps
from dig_jax.diffusion import space_timesteps


def test_linear_betas_endpoints_and_scaling():
  betas = get_named_beta_schedule("linear", 1000)
  assert betas.dtype == np.float64 and betas.shape == (1000,)
  assert betas[0] == pytest.approx(1e-4, abs=1e-15)
  assert betas[-1] == pytest.approx(0.02, abs=1e-15)
  np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
  # DiT scales the endpoints by 1000 / T.
  short = get_named_beta_schedule("linear", 100)
  assert short[0] == pytest.approx(1e-3) and short[-1] == pytest.approx(0.2)


def test_cosine_alphas_cumprod_follows_squared_cosine():
  num_steps = 1000
  betas = get_named_beta_schedule("squaredcos_cap_v2", num_steps)
  assert np.all(betas <= 0.999) and np.all(betas > 0)
  f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  expected = np.array([f((i + 1) / num_steps) / f(0.0) for i in range(num_steps)])
  abar = np.cumprod(1.0 - betas)
  # Only the very last beta hits the 0.999 cap.
  np.testing.assert_array_equal(np.flatnonzero(betas >= 0.999), [num_steps - 1])
  np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-10)


@pytest.mark.parametrize("schedule_name", ["linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(schedule_name):
  diffusion = create_diffusion("", noise_schedule=schedule_name)
  abar = diffusion.tables64["alphas_cumprod"]
  assert np.all(np.diff(abar) < 0)
  assert np.all((abar > 0) & (abar < 1))
  assert diffusion.alphas_cumprod.dtype == np.float32  # device copy


def test_linear_alphas_cumprod_known_values():
  # Values quoted in vae_eval.md section 3.1 (computed independently in float64).
  abar = create_diffusion("").tables64["alphas_cumprod"]
  assert abar[0] == pytest.approx(0.9999, abs=1e-12)
  assert abar[100] == pytest.approx(0.8951, abs=1e-4)
  assert abar[500] == pytest.approx(0.0778, abs=1e-4)
  assert abar[999] == pytest.approx(4.0358e-5, rel=1e-4)


def test_full_schedule_is_identity_respacing():
  for spec in ("", None, "1000", 1000):
    diffusion = create_diffusion(spec)
    assert diffusion.num_timesteps == 1000
    np.testing.assert_array_equal(diffusion.timestep_map, np.arange(1000))
  np.testing.assert_allclose(diffusion.tables64["betas"], get_named_beta_schedule("linear", 1000), rtol=1e-10)


@pytest.mark.parametrize("spec", ["250", 250, "ddim50", "10,5,20", "25"])
def test_respaced_alphas_cumprod_equal_originals_at_kept_steps(spec):
  full = create_diffusion("")
  spaced = create_diffusion(spec)
  kept = spaced.timestep_map
  assert np.all(np.diff(kept) > 0) and kept[0] == 0
  np.testing.assert_allclose(spaced.tables64["alphas_cumprod"], full.tables64["alphas_cumprod"][kept],
                             rtol=1e-12)
  # 1 - beta'_k = abar[s_k] / abar[s_{k-1}]
  abar = full.tables64["alphas_cumprod"][kept]
  np.testing.assert_allclose(1 - spaced.tables64["betas"][1:], abar[1:] / abar[:-1], rtol=1e-12)


def test_respaced_timestep_maps():
  assert list(create_diffusion("ddim50").timestep_map) == list(range(0, 1000, 20))
  kept = create_diffusion("250").timestep_map
  assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
  np.testing.assert_array_equal(create_diffusion(250).timestep_map, kept)
  # Hand-derived: 4 of 10 steps, stride 9/3 = 3.
  assert space_timesteps(10, "4") == [0, 3, 6, 9]
  assert space_timesteps(1000, "10") == list(range(0, 1000, 111))
  # Two sections of 50: strides 49/9 and 49/4 = 12.25, Python rounding (24.5 -> 24).
  assert space_timesteps(100, "10,5") == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]


@pytest.mark.parametrize("bad", ["2000", "ddim3000", "abc", "ddimx", "0", "1"])
def test_bad_respacing_raises(bad):
  with pytest.raises(ValueError):
    create_diffusion(bad)


def test_bad_schedule_name_raises():
  with pytest.raises(ValueError, match="noise_schedule"):
    create_diffusion("", noise_schedule="quadratic")


def test_sample_timesteps_uniform_range():
  t = sample_timesteps(jax.random.key(0), 4096, 1000)
  assert t.shape == (4096,) and t.dtype == np.int32
  t = np.asarray(t)
  assert t.min() >= 0 and t.max() <= 999
  assert 400 < t.mean() < 600 and len(np.unique(t)) > 900


def test_device_tables_first_built_inside_jit_are_concrete():
  diffusion = create_diffusion("20")
  x = jnp.ones((2, 1, 1, 1))
  t = jnp.array([0, 19], jnp.int32)
  inside = jax.jit(diffusion.q_sample)(x, t, x)  # first use of the float32 tables is under a trace
  eager = diffusion.q_sample(x, t, x)  # a leaked tracer would raise here
  np.testing.assert_allclose(inside, eager, rtol=1e-6)
  abar = diffusion.tables64["alphas_cumprod"][[0, 19]]
  np.testing.assert_allclose(eager[:, 0, 0, 0], np.sqrt(abar) + np.sqrt(1 - abar), rtol=1e-6)
