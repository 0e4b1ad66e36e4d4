"""Likelihood helpers of the DiT/DiG diffusion loss: Gaussian KL and the discretised Gaussian decoder.

These are the formulas DiT uses for its variational bound (facts, re-derived here, not copied):

- KL(N(m1, e^lv1) || N(m2, e^lv2)) = 0.5 (-1 + lv2 - lv1 + e^(lv1 - lv2) + (m1 - m2)^2 e^(-lv2)),
  elementwise, in nats.
- The decoder log-likelihood treats data in [-1, 1] as 256 bins of width 2/255. The Gaussian CDF is DiT's
  tanh approximation 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); the outermost bins extend to -inf / +inf;
  probabilities are floored at 1e-12 before the log.

All functions are elementwise and dtype-preserving (float64 inputs stay float64).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_BIN_HALF_WIDTH = 1.0 / 255.0
_PROB_FLOOR = 1e-12


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all non-batch axes: [N, ...] -> [N]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
  """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """The tanh approximation of the standard normal CDF used by DiT."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
  """Log-probability (nats) of data x in [-1, 1] under a Gaussian discretised into 256 bins.

  Args:
    x: data, assumed to lie on the grid -1 + 2k/255.
    means: Gaussian means, broadcastable to x.
    log_scales: log standard deviations, broadcastable to x.

  Returns:
    Elementwise log-probabilities with the shape of x.
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_upper = approx_standard_normal_cdf(inv_std * (centered + _BIN_HALF_WIDTH))
  cdf_lower = approx_standard_normal_cdf(inv_std * (centered - _BIN_HALF_WIDTH))
  log_cdf_upper = jnp.log(jnp.maximum(cdf_upper, _PROB_FLOOR))
  log_one_minus_cdf_lower = jnp.log(jnp.maximum(1.0 - cdf_lower, _PROB_FLOOR))
  log_bin_mass = jnp.log(jnp.maximum(cdf_upper - cdf_lower, _PROB_FLOOR))
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_one_minus_cdf_lower, log_bin_mass))
