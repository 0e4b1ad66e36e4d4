"""q(x_t | x_0), the true posterior q(x_{t-1} | x_t, x_0) and p_mean_variance against float64 closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dig_jax.diffusion import create_diffusion

SHAPE = (3, 2, 2, 3)


def _reference_alphas_cumprod(kept=None):
  """Independent float64 abar of DiT's linear schedule (optionally at kept steps)."""
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
  return abar if kept is None else abar[np.asarray(kept)]


def _rand(seed, shape=SHAPE):
  return np.random.default_rng(seed).standard_normal(shape)


def test_q_sample_closed_form_float64():
  diffusion = create_diffusion("")
  x0, noise = _rand(0), _rand(1)
  t = np.array([0, 517, 999])
  abar = _reference_alphas_cumprod()[t][:, None, None, None]
  with jax.enable_x64(True):
    got = diffusion.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    mean, var, log_var = diffusion.q_mean_variance(jnp.asarray(x0), jnp.asarray(t))
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(mean, np.sqrt(abar) * x0, rtol=1e-12)
  np.testing.assert_allclose(var, np.broadcast_to(1 - abar, SHAPE), rtol=1e-12)
  np.testing.assert_allclose(log_var, np.log(np.broadcast_to(1 - abar, SHAPE)), rtol=1e-12)


def test_q_sample_empirical_moments():
  diffusion = create_diffusion("")
  num_draws = 20000
  x0 = jnp.array([0.8, -0.5, 0.1, 1.0]).reshape(1, 2, 2, 1)
  for step in (10, 400, 990):
    t = jnp.full((num_draws,), step, dtype=jnp.int32)
    noise = jax.random.normal(jax.random.key(step), (num_draws, 2, 2, 1))
    samples = np.asarray(diffusion.q_sample(jnp.broadcast_to(x0, noise.shape), t, noise), np.float64)
    abar = _reference_alphas_cumprod()[step]
    std_err = np.sqrt((1 - abar) / num_draws)
    np.testing.assert_allclose(samples.mean(0), np.sqrt(abar) * np.asarray(x0[0]), atol=5 * std_err)
    np.testing.assert_allclose(samples.var(0), 1 - abar, rtol=0.05)


@pytest.mark.parametrize("spec", ["", "50"])
def test_posterior_mean_variance_closed_form(spec):
  diffusion = create_diffusion(spec)
  kept = diffusion.timestep_map
  abar_all = _reference_alphas_cumprod(kept)
  t = np.array([0, 1, diffusion.num_timesteps // 2, diffusion.num_timesteps - 1])
  x0, x_t = _rand(2, (4, 2, 2, 3)), _rand(3, (4, 2, 2, 3))
  # Ho et al. eq. 7 for the (respaced) chain whose marginals are abar at the kept steps.
  abar = abar_all[t]
  abar_prev = np.where(t > 0, abar_all[np.maximum(t - 1, 0)], 1.0)
  beta = 1 - abar / abar_prev
  coef_x0 = np.sqrt(abar_prev) * beta / (1 - abar)
  coef_xt = np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
  expected_mean = coef_x0[:, None, None, None] * x0 + coef_xt[:, None, None, None] * x_t
  expected_var = (1 - abar_prev) / (1 - abar) * beta
  var_t1 = (1 - abar_all[0]) / (1 - abar_all[1]) * (1 - abar_all[1] / abar_all[0])
  expected_log_var_clipped = np.log(np.where(t == 0, var_t1, expected_var))
  with jax.enable_x64(True):
    mean, var, log_var = diffusion.q_posterior_mean_variance(
        jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t))
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(var[:, 0, 0, 0], expected_var, rtol=1e-10, atol=1e-15)
  np.testing.assert_allclose(log_var[:, 0, 0, 0], expected_log_var_clipped, rtol=1e-10)
  assert expected_var[0] == 0.0  # t == 0: the posterior is a point mass, hence the clipping.


def test_p_mean_variance_learned_range_float64():
  diffusion = create_diffusion("50")
  abar_all = _reference_alphas_cumprod(diffusion.timestep_map)
  t = np.array([0, 7, 30, 49])
  x_t, eps = _rand(4, (4, 2, 2, 3)), _rand(5, (4, 2, 2, 3))
  v = np.random.default_rng(6).uniform(-1, 1, (4, 2, 2, 3))
  abar = abar_all[t]
  abar_prev = np.where(t > 0, abar_all[np.maximum(t - 1, 0)], 1.0)
  beta = 1 - abar / abar_prev
  post_var = (1 - abar_prev) / (1 - abar) * beta
  post_var_t1 = (1 - abar_all[0]) / (1 - abar_all[1]) * (1 - abar_all[1] / abar_all[0])
  min_log = np.log(np.where(t == 0, post_var_t1, post_var))[:, None, None, None]
  max_log = np.log(beta)[:, None, None, None]
  frac = (v + 1) / 2
  b = lambda a: a[:, None, None, None]
  expected_x0 = x_t / np.sqrt(b(abar)) - np.sqrt(1 / b(abar) - 1) * eps
  expected_mean = (np.sqrt(b(abar_prev)) * b(beta) / (1 - b(abar)) * expected_x0
                   + np.sqrt(1 - b(beta)) * (1 - b(abar_prev)) / (1 - b(abar)) * x_t)
  with jax.enable_x64(True):
    output = jnp.concatenate([jnp.asarray(eps), jnp.asarray(v)], axis=-1)
    out = diffusion.p_mean_variance(lambda x, tt: output, jnp.asarray(x_t), jnp.asarray(t))
    clipped = diffusion.p_mean_variance(lambda x, tt: output, jnp.asarray(x_t), jnp.asarray(t), True)
  np.testing.assert_allclose(out["log_variance"], frac * max_log + (1 - frac) * min_log, rtol=1e-10)
  np.testing.assert_allclose(out["variance"], np.exp(frac * max_log + (1 - frac) * min_log), rtol=1e-10)
  np.testing.assert_allclose(out["pred_xstart"], expected_x0, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(out["mean"], expected_mean, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(clipped["pred_xstart"], np.clip(expected_x0, -1, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sigma_small", [False, True])
def test_p_mean_variance_fixed_variances(sigma_small):
  diffusion = create_diffusion("", learn_sigma=False, sigma_small=sigma_small)
  abar = _reference_alphas_cumprod()
  betas = np.linspace(1e-4, 0.02, 1000)
  t = np.array([0, 1, 600])
  post_var = np.array([0.0] + list((1 - abar[:-1]) / (1 - abar[1:]) * betas[1:]))
  if sigma_small:
    expected = np.where(t == 0, post_var[1], post_var[t])  # log variance is clipped at t = 0
    expected_var = post_var[t]
  else:
    expected = np.where(t == 0, post_var[1], betas[t])
    expected_var = expected
  x_t = _rand(7, (3, 2, 2, 3))
  with jax.enable_x64(True):
    out = diffusion.p_mean_variance(lambda x, tt: 0.3 * x, jnp.asarray(x_t), jnp.asarray(t))
  np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0], np.log(expected), rtol=1e-10)
  np.testing.assert_allclose(out["variance"][:, 0, 0, 0], expected_var, rtol=1e-10, atol=1e-15)


def test_model_receives_original_timesteps():
  diffusion = create_diffusion("ddim50")  # respaced index k <-> original step 20 k
  t = jnp.array([0, 1, 25, 49], dtype=jnp.int32)
  seen = {}

  def model_fn(x, original_t):
    seen["dtype"] = original_t.dtype
    # epsilon = original t / 1000 everywhere.
    return jnp.broadcast_to((original_t / 1000.0)[:, None, None, None], x.shape[:-1] + (6,)) * jnp.ones(6)

  x_t = jnp.ones((4, 2, 2, 3))
  out = diffusion.p_mean_variance(model_fn, x_t, t)
  abar = _reference_alphas_cumprod()[20 * np.asarray(t)]
  eps = 20 * np.asarray(t) / 1000.0
  expected = 1 / np.sqrt(abar) - np.sqrt(1 / abar - 1) * eps
  np.testing.assert_allclose(out["pred_xstart"][:, 0, 0, 0], expected, rtol=1e-5)
  assert seen["dtype"] == jnp.int32
  np.testing.assert_array_equal(diffusion.original_timesteps(t), [0, 20, 500, 980])


def test_wrong_output_channels_raise():
  diffusion = create_diffusion("")
  with pytest.raises(ValueError, match="learn_sigma"):
    diffusion.p_mean_variance(lambda x, t: x, jnp.ones((1, 2, 2, 3)), jnp.zeros((1,), jnp.int32))
