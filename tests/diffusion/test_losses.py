"""normal_kl, the discretised Gaussian decoder, the VLB of the exact posterior, and training_losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dig_jax.diffusion import create_diffusion
from dig_jax.diffusion import discretized_gaussian_log_likelihood
from dig_jax.diffusion import normal_kl


def _exact_normal_cdf(z):
  return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z) / math.sqrt(2.0)))


def test_normal_kl_matches_closed_form():
  rng = np.random.default_rng(0)
  m1, m2 = rng.standard_normal(50), rng.standard_normal(50)
  s1, s2 = rng.uniform(0.1, 2.0, 50), rng.uniform(0.1, 2.0, 50)
  expected = np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
  with jax.enable_x64(True):
    got = normal_kl(jnp.asarray(m1), jnp.asarray(2 * np.log(s1)),
                    jnp.asarray(m2), jnp.asarray(2 * np.log(s2)))
  np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
  assert np.all(np.asarray(got) > 0)
  np.testing.assert_allclose(normal_kl(1.3, -0.4, 1.3, -0.4), 0.0, atol=1e-7)


def test_discretized_log_likelihood_is_normalised_over_the_256_bins():
  bins = -1.0 + 2.0 * np.arange(256) / 255.0
  with jax.enable_x64(True):
    cases = [(0.0, np.log(0.3)), (0.7, np.log(0.05)), (-0.95, np.log(0.5)), (0.2, np.log(2.0))]
    for mean, log_scale in cases:
      logp = discretized_gaussian_log_likelihood(jnp.asarray(bins), means=mean, log_scales=log_scale)
      assert np.exp(np.asarray(logp)).sum() == pytest.approx(1.0, abs=1e-9)


def test_discretized_log_likelihood_against_exact_gaussian_bins():
  bins = -1.0 + 2.0 * np.arange(256) / 255.0
  mean, scale = 0.1, 0.4
  upper = np.where(bins > 0.999, np.inf, bins + 1 / 255)
  lower = np.where(bins < -0.999, -np.inf, bins - 1 / 255)
  exact_prob = _exact_normal_cdf((upper - mean) / scale) - _exact_normal_cdf((lower - mean) / scale)
  with jax.enable_x64(True):
    logp = discretized_gaussian_log_likelihood(jnp.asarray(bins), means=mean, log_scales=np.log(scale))
  prob = np.exp(np.asarray(logp))
  # The tanh CDF approximation is off by up to ~2e-4 absolute; interior bins take differences of nearby
  # CDF values, so their error is far smaller. Bins hold up to ~1e-2 mass here.
  np.testing.assert_allclose(prob[1:-1], exact_prob[1:-1], atol=3e-5)
  big = exact_prob[1:-1] > 1e-3
  np.testing.assert_allclose(np.asarray(logp)[1:-1][big], np.log(exact_prob[1:-1][big]), atol=2e-2)
  # The edge bins take the tails.
  assert prob[0] == pytest.approx(_exact_normal_cdf((-1 + 1 / 255 - mean) / scale), abs=3e-4)
  assert prob[-1] == pytest.approx(1 - _exact_normal_cdf((1 - 1 / 255 - mean) / scale), abs=3e-4)


def _exact_posterior_output(noise, value):
  # x_t = q_sample(x0, t, noise), so epsilon = noise reproduces x0 exactly.
  return jnp.concatenate([noise, jnp.full_like(noise, value)], axis=-1)


@pytest.mark.parametrize("spec", ["", "50"])
def test_vlb_of_exact_posterior_is_zero_for_t_positive(spec):
  diffusion = create_diffusion(spec)
  rng = np.random.default_rng(1)
  t = np.array([1, 2, diffusion.num_timesteps // 3, diffusion.num_timesteps - 1])
  x0 = rng.uniform(-1, 1, (4, 2, 2, 3))
  noise = rng.standard_normal((4, 2, 2, 3))
  with jax.enable_x64(True):
    x0, noise, t = jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)
    x_t = diffusion.q_sample(x0, t, noise)
    exact = diffusion.vb_terms_bpd(lambda x, tt: _exact_posterior_output(noise, -1.0), x0, x_t, t)
    wrong_var = diffusion.vb_terms_bpd(lambda x, tt: _exact_posterior_output(noise, 1.0), x0, x_t, t)
    losses = diffusion.training_losses(lambda x, tt: _exact_posterior_output(noise, -1.0), x0, t, noise)
  np.testing.assert_allclose(exact["output"], 0.0, atol=1e-10)
  np.testing.assert_allclose(exact["pred_xstart"], x0, atol=1e-10)
  # beta_t differs from beta~_t most at small t (they converge at large t), so that KL is clearly positive.
  assert np.all(np.asarray(wrong_var["output"])[:2] > 1e-2) and np.all(np.asarray(wrong_var["output"]) >= 0)
  np.testing.assert_allclose(losses["mse"], 0.0, atol=1e-20)
  np.testing.assert_allclose(losses["vb"], 0.0, atol=1e-10)


def test_vb_at_t0_is_the_decoder_nll_in_bits():
  diffusion = create_diffusion("")
  x0 = jnp.asarray(-1.0 + 2.0 * np.random.default_rng(2).integers(0, 256, (2, 2, 2, 3)) / 255.0)
  noise = jnp.asarray(np.random.default_rng(3).standard_normal((2, 2, 2, 3)))
  t = jnp.zeros((2,), jnp.int32)
  with jax.enable_x64(True):
    x0, noise = jnp.asarray(x0, jnp.float64), jnp.asarray(noise, jnp.float64)
    x_t = diffusion.q_sample(x0, t, noise)
    output = _exact_posterior_output(noise, 0.0)
    vb = diffusion.vb_terms_bpd(lambda x, tt: output, x0, x_t, t)["output"]
    out = diffusion.p_mean_variance(lambda x, tt: output, x_t, t)
    nll = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
  np.testing.assert_allclose(vb, np.asarray(nll).mean(axis=(1, 2, 3)) / np.log(2.0), rtol=1e-12)
  assert np.all(np.asarray(vb) > 0)


def _draws(seed, shape):
  """x0 ~ U(-1, 1) and noise ~ N(0, 1) of one shape, float32. NumPy draws: an eager jax.random draw compiles
  once per new shape (a few tenths of a second each on a 2-core CPU)."""
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32),
          jnp.asarray(rng.standard_normal(shape), jnp.float32))


def _linear_model(params, x, t):
  """A tiny per-pixel linear model with a timestep-dependent bias; output has 2C channels."""
  return x @ params["w"] + (t.astype(x.dtype) / 1000.0)[:, None, None, None] * params["u"]


def test_training_losses_shapes_finiteness_and_gradients():
  diffusion = create_diffusion("")
  x0, noise = _draws(0, (4, 4, 4, 3))
  t = jnp.array([0, 1, 500, 999], jnp.int32)
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(0.1 * rng.standard_normal((3, 6)), jnp.float32),
            "u": jnp.asarray(0.1 * rng.standard_normal(6), jnp.float32)}

  def mean_loss(params):
    terms = diffusion.training_losses(lambda x, tt: _linear_model(params, x, tt), x0, t, noise)
    return terms["loss"].mean(), terms

  (loss, terms), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
  for key in ("loss", "mse", "vb"):
    assert terms[key].shape == (4,) and np.all(np.isfinite(terms[key]))
  np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-6)
  x_t = np.sqrt(diffusion.tables64["alphas_cumprod"][t])[:, None, None, None] * x0 + np.sqrt(
      1 - diffusion.tables64["alphas_cumprod"][t])[:, None, None, None] * noise
  eps = np.asarray(_linear_model(params, jnp.asarray(x_t, jnp.float32), t))[..., :3]
  np.testing.assert_allclose(terms["mse"], ((np.asarray(noise) - eps) ** 2).mean(axis=(1, 2, 3)), rtol=1e-4)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_vb_gradient_does_not_reach_the_epsilon_half():
  diffusion = create_diffusion("")
  x0, noise = _draws(2, (3, 2, 2, 3))
  t = jnp.array([0, 10, 700], jnp.int32)
  output = jnp.concatenate([0.5 * noise, 0.3 * jnp.ones_like(noise)], axis=-1)

  def term(name):
    return lambda out: diffusion.training_losses(lambda x, tt: out, x0, t, noise)[name].sum()

  grad_vb = np.asarray(jax.grad(term("vb"))(output))
  grad_mse = np.asarray(jax.grad(term("mse"))(output))
  assert np.all(grad_vb[..., :3] == 0)
  assert np.all(np.isfinite(grad_vb)) and np.any(grad_vb[..., 3:] != 0)
  assert np.all(grad_mse[..., 3:] == 0) and np.any(grad_mse[..., :3] != 0)


def test_loss_variants():
  x0, noise = _draws(3, (2, 2, 2, 3))
  t = jnp.array([3, 40], jnp.int32)
  learned = lambda x, tt: jnp.concatenate([0.9 * x, 0.2 * jnp.ones_like(x)], -1)

  fixed = create_diffusion("", learn_sigma=False).training_losses(lambda x, tt: 0.9 * x, x0, t, noise)
  np.testing.assert_array_equal(fixed["vb"], 0.0)
  np.testing.assert_array_equal(fixed["loss"], fixed["mse"])

  plain = create_diffusion("100").training_losses(learned, x0, t, noise)
  rescaled = create_diffusion("100", rescale_learned_sigmas=True).training_losses(learned, x0, t, noise)
  np.testing.assert_allclose(rescaled["vb"], 0.1 * plain["vb"], rtol=1e-6)
  np.testing.assert_allclose(rescaled["mse"], plain["mse"], rtol=1e-6)

  kl = create_diffusion("100", use_kl=True).training_losses(learned, x0, t, noise)
  np.testing.assert_allclose(kl["vb"], plain["vb"], rtol=1e-6)
  np.testing.assert_allclose(kl["loss"], 100 * plain["vb"], rtol=1e-6)


def test_min_snr_weighting_matches_closed_form():
  """Min-SNR-gamma: the epsilon MSE is scaled by min(SNR, gamma) / SNR, SNR = abar / (1 - abar); VB as is."""
  x0, noise = _draws(5, (4, 2, 2, 1))
  t = jnp.array([0, 30, 300, 999], jnp.int32)
  learned = lambda x, tt: jnp.concatenate([0.7 * x, 0.1 * jnp.ones_like(x)], -1)
  plain = create_diffusion("").training_losses(learned, x0, t, noise)
  gamma = 5.0
  weighted = create_diffusion("", min_snr_gamma=gamma).training_losses(learned, x0, t, noise)
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)]
  snr = abar / (1.0 - abar)
  expected = np.minimum(snr, gamma) / snr
  assert expected[-1] == pytest.approx(1.0) and expected[0] < 1e-3  # high noise kept, low noise capped
  np.testing.assert_allclose(weighted["mse"], plain["mse"] * expected, rtol=2e-5)
  np.testing.assert_allclose(weighted["vb"], plain["vb"], rtol=1e-6)
  np.testing.assert_allclose(weighted["loss"], weighted["mse"] + weighted["vb"], rtol=1e-6)
  with pytest.raises(ValueError, match="min_snr_gamma"):
    create_diffusion("", min_snr_gamma=-1.0)
