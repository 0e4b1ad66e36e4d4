"""DDPM, DDIM and DPM-Solver++(2M) loops: oracle models, determinism, RNG use and channel handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dig_jax.diffusion import create_diffusion
from dig_jax.diffusion.samplers import dpm_solver_timesteps

SHAPE = (2, 4, 4, 3)
# NumPy draws (float32): an eager jax.random draw compiles once per new shape, a few tenths of a second each.
X_STAR = jnp.asarray(np.random.default_rng(42).uniform(-1.0, 1.0, SHAPE), jnp.float32)


def _noise(seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(SHAPE), jnp.float32)


def _delta_oracle(diffusion, x_star, var_value=0.3, learn_sigma=True):
  """Optimal epsilon for data = the single point x_star, using the ORIGINAL schedule at the given t."""
  abar_table = jnp.asarray(diffusion.original_alphas_cumprod, jnp.float32)

  def model_fn(x, t):
    abar = abar_table[t][:, None, None, None]
    eps = (x - jnp.sqrt(abar) * x_star) / jnp.sqrt(1.0 - abar)
    return jnp.concatenate([eps, jnp.full_like(eps, var_value)], -1) if learn_sigma else eps

  return model_fn


def _shrink_model(x, t):
  return jnp.concatenate([0.5 * x, jnp.zeros_like(x)], -1)


@pytest.fixture(scope="module")
def diffusion50():
  return create_diffusion("50")


def test_ddim_and_ddpm_with_delta_oracle_return_the_point(diffusion50):
  oracle = _delta_oracle(diffusion50, X_STAR)
  ddim = jax.jit(lambda r: diffusion50.ddim_sample_loop(oracle, SHAPE, r))(jax.random.key(0))
  ddim_eta1 = jax.jit(lambda r: diffusion50.ddim_sample_loop(oracle, SHAPE, r, eta=1.0))(jax.random.key(0))
  ddpm = jax.jit(lambda r: diffusion50.p_sample_loop(oracle, SHAPE, r))(jax.random.key(1))
  for samples in (ddim, ddim_eta1, ddpm):
    assert samples.shape == SHAPE
    np.testing.assert_allclose(samples, X_STAR, atol=1e-4)


def test_ddpm_with_fixed_variance_oracle_returns_the_point():
  diffusion = create_diffusion("25", learn_sigma=False)
  oracle = _delta_oracle(diffusion, X_STAR, learn_sigma=False)
  samples = jax.jit(lambda r: diffusion.p_sample_loop(oracle, SHAPE, r))(jax.random.key(2))
  np.testing.assert_allclose(samples, X_STAR, atol=1e-4)


def test_ddim_eta0_is_deterministic(diffusion50):
  loop = jax.jit(lambda r, n: diffusion50.ddim_sample_loop(_shrink_model, SHAPE, r, noise=n))
  noise = _noise(3)
  a = loop(jax.random.key(0), noise)
  b = loop(jax.random.key(1), noise)  # other key, same x_T
  np.testing.assert_array_equal(a, b)
  no_noise = jax.jit(lambda r: diffusion50.ddim_sample_loop(_shrink_model, SHAPE, r))
  np.testing.assert_array_equal(no_noise(jax.random.key(5)), no_noise(jax.random.key(5)))
  assert np.all(np.isfinite(a))


def test_ddpm_reproducible_per_key_and_differs_across_keys(diffusion50):
  noise = _noise(3)
  loop = jax.jit(lambda r: diffusion50.p_sample_loop(_shrink_model, SHAPE, r, noise=noise))
  a, a_again, b = loop(jax.random.key(0)), loop(jax.random.key(0)), loop(jax.random.key(1))
  np.testing.assert_array_equal(a, a_again)
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-3  # per-step noise depends on the key
  eta1 = jax.jit(lambda r: diffusion50.ddim_sample_loop(_shrink_model, SHAPE, r, eta=1.0, noise=noise))
  assert np.max(np.abs(np.asarray(eta1(jax.random.key(0))) - np.asarray(eta1(jax.random.key(1))))) > 1e-3


def test_ddim_and_dpm_ignore_the_variance_half(diffusion50):
  noise = _noise(4)
  oracle_a = _delta_oracle(diffusion50, 0.5 * X_STAR, var_value=-0.9)
  oracle_b = _delta_oracle(diffusion50, 0.5 * X_STAR, var_value=0.7)
  ddim = jax.jit(lambda m: diffusion50.ddim_sample_loop(m, SHAPE, jax.random.key(0), noise=noise),
                 static_argnums=0)
  np.testing.assert_array_equal(ddim(oracle_a), ddim(oracle_b))
  dpm = jax.jit(lambda m: diffusion50.dpm_solver_pp_sample_loop(m, SHAPE, jax.random.key(0), num_steps=8,
                                                               noise=noise), static_argnums=0)
  np.testing.assert_array_equal(dpm(oracle_a), dpm(oracle_b))


def test_dpm_solver_grid():
  np.testing.assert_array_equal(dpm_solver_timesteps(1000, 10),
                                [999, 899, 799, 699, 599, 500, 400, 300, 200, 100])
  grid = dpm_solver_timesteps(1000, 25)
  assert grid[0] == 999 and grid[1] == 959 and grid[-2] == 80 and grid[-1] == 40
  with pytest.raises(ValueError):
    dpm_solver_timesteps(1000, 0)


def test_dpm_solver_point_mass_returns_the_point():
  diffusion = create_diffusion("")  # respacing is ignored by DPM-Solver anyway
  oracle = _delta_oracle(diffusion, X_STAR)
  for steps in (3, 12):
    samples = jax.jit(lambda r: diffusion.dpm_solver_pp_sample_loop(oracle, SHAPE, r, num_steps=steps))(
        jax.random.key(steps))
    np.testing.assert_allclose(samples, X_STAR, atol=1e-5)


@pytest.mark.parametrize("num_steps,expected", [
    (10, [-0.5076997, -0.1042343, 0.2992311, 0.7026964, 1.3078945]),
    (25, [-0.6765857, -0.1887577, 0.2990703, 0.7868983, 1.5186403]),
    (50, [-0.7005065, -0.2007295, 0.2990475, 0.7988245, 1.5484900]),
])
def test_dpm_solver_gaussian_toy_matches_reference(num_steps, expected):
  # vae_eval.md section 3.6.3: data N(0.3, 0.5^2), x_T = [-2, -1, 0, 1, 2.5], diffusers-style grid with a
  # final sigma = 0; expected values from an independent float64 NumPy emulation.
  diffusion = create_diffusion("250")
  mean, var = 0.3, 0.25
  with jax.enable_x64(True):
    abar_table = jnp.asarray(diffusion.original_alphas_cumprod)

    def exact_eps(x, t):
      abar = abar_table[t][:, None, None, None]
      alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
      return sigma * (x - alpha * mean) / (abar * var + sigma ** 2)

    x_T = jnp.asarray([-2.0, -1.0, 0.0, 1.0, 2.5], jnp.float64).reshape(5, 1, 1, 1)
    got = diffusion.dpm_solver_pp_sample_loop(exact_eps, x_T.shape, jax.random.key(0), num_steps=num_steps,
                                              noise=x_T)
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got).ravel(), expected, atol=2e-7)


def test_noise_shape_mismatch_raises(diffusion50):
  with pytest.raises(ValueError, match="shape"):
    diffusion50.ddim_sample_loop(_shrink_model, SHAPE, jax.random.key(0), noise=jnp.zeros((1, 4, 4, 3)))


def test_dpm_solver_clipping_keeps_exact_results_and_bounds_out_of_range_predictions():
  """clip_denoised: no effect while every x0 stays in [-1, 1]; a model whose x0 leaves the range (epsilon = 0,
  so x0 = x_t / alpha) gives samples far outside it unclipped and inside it clipped."""
  cosine = create_diffusion("", noise_schedule="squaredcos_cap_v2", learn_sigma=False)
  oracle = _delta_oracle(cosine, X_STAR, learn_sigma=False)
  run = lambda model, clip: cosine.dpm_solver_pp_sample_loop(model, SHAPE, jax.random.key(3), num_steps=10,
                                                             clip_denoised=clip)
  np.testing.assert_allclose(run(oracle, True), run(oracle, False), atol=1e-6)
  np.testing.assert_allclose(run(oracle, True), X_STAR, atol=1e-4)
  zero_eps = lambda x, t: jnp.zeros_like(x)
  assert np.abs(np.asarray(run(zero_eps, False))).max() > 10.0
  assert np.abs(np.asarray(run(zero_eps, True))).max() <= 1.0 + 1e-6
