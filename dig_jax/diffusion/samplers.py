"""Sampling loops for the DiT/DiG diffusion: ancestral DDPM, DDIM and DPM-Solver++(2M), jittable end to end.

Each loop is one `jax.lax.scan` over a static step grid, so `jax.jit(lambda rng: loop(...))` compiles the
model once per loop, not once per step. Per-step randomness comes from `jax.random.split(rng, steps)`.

- DDPM (what DiT/DiG report, 250 respaced steps): x_{t-1} = mean + exp(0.5 log var) z, with no noise at the
  last step (t == 0), as DiT.
- DDIM (Song et al.): x_{t-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
  sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev); eps is re-derived from the
  (optionally clipped) x0_hat, and the last step returns x0_hat (abar_prev = 1), as DiT.
- DPM-Solver++(2M) (Lu et al. 2022; data-prediction, midpoint variant, see vae_eval.md section 3). It runs on
  the ORIGINAL (un-respaced) schedule on diffusers' default grid: integer timesteps
  round(linspace(0, T-1, n+1)) reversed without the 0, then a final sigma = 0. Step 1 and the last step are
  first order (the last one returns x0_hat of the last model call), the others second-order multistep.
  Coefficients are computed in float64 on the host. With a learned sigma, only the epsilon half is used.
  Deviation: the official LuChengTHU solver uses continuous (non-integer) times; our model contract takes
  int32 timesteps, so we use the integer diffusers grid.

Classifier-free guidance is the model's job (`forward_with_cfg`); a sampler only sees `model_fn`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
  from dig_jax.diffusion.gaussian_diffusion import GaussianDiffusion

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _initial_noise(shape: Sequence[int], rng: jax.Array, noise: jax.Array | None) -> jax.Array:
  shape = tuple(int(s) for s in shape)
  if noise is None:
    return jax.random.normal(rng, shape, jnp.float32)
  if tuple(noise.shape) != shape:
    raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={shape} was requested.")
  return noise


def _scan_over_steps(diffusion: GaussianDiffusion, step_fn, shape: Sequence[int], rng: jax.Array,
                     noise: jax.Array | None) -> jax.Array:
  init_key, steps_key = jax.random.split(rng)
  x = _initial_noise(shape, init_key, noise)
  indices = jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  keys = jax.random.split(steps_key, diffusion.num_timesteps)

  def body(x, step_inputs):
    index, key = step_inputs
    t = jnp.full((x.shape[0],), index, dtype=jnp.int32)
    return step_fn(x, t, key)["sample"], None

  x, _ = jax.lax.scan(body, x, (indices, keys))
  return x


def p_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int], rng: jax.Array, *,
                  clip_denoised: bool = False, noise: jax.Array | None = None) -> jax.Array:
  """Ancestral DDPM from x_T ~ N(0, I) (or `noise`) down to x_0 over all respaced steps.

  Args:
    diffusion: the (respaced) diffusion; DiT samples with `create_diffusion("250")`.
    model_fn: (x_t, original t int32 [N]) -> output.
    shape: [N, H, W, C] of the samples.
    rng: key for x_T (unless `noise` is given) and the per-step noise.
    clip_denoised: clip x0_hat to [-1, 1] (DiT uses False for latents).
    noise: optional x_T.
  """
  def step(x, t, key):
    return diffusion.p_sample(model_fn, x, t, key, clip_denoised)
  return _scan_over_steps(diffusion, step, shape, rng, noise)


def ddim_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int], rng: jax.Array, *,
                     eta: float = 0.0, clip_denoised: bool = False,
                     noise: jax.Array | None = None) -> jax.Array:
  """DDIM from x_T down to x_0 over all respaced steps (eta = 0: deterministic given x_T)."""
  def step(x, t, key):
    return diffusion.ddim_sample(model_fn, x, t, key, eta, clip_denoised)
  return _scan_over_steps(diffusion, step, shape, rng, noise)


def dpm_solver_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
  """diffusers' "linspace" grid: round(linspace(0, T-1, n+1)) reversed, without the final 0 (int64 [n])."""
  if not 1 <= num_steps < num_train_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_train_timesteps - 1}], got {num_steps}.")
  grid = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1]
  return grid.astype(np.int64)


def dpm_solver_coefficients(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> dict[str, np.ndarray]:
  """Float64 per-step coefficients of DPM-Solver++(2M) ending at sigma = 0.

  Step i goes from s = timesteps[i] to the next grid point (sigma = 0 after the last) as
  x <- (sigma_next / sigma_s) x - alpha_next expm1(-h) D, with D = x0_i + c_i (x0_i - x0_{i-1}).
  """
  abar = np.asarray(alphas_cumprod, dtype=np.float64)[timesteps]
  alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
  lam = np.log(alpha) - np.log(sigma)
  n = len(timesteps)
  x_coef = np.zeros(n)
  x0_coef = np.ones(n)  # The final step to sigma = 0 returns D (alpha = 1, expm1(-inf) = -1).
  h = np.diff(lam)  # h[i] = lambda_{i+1} - lambda_i for the n - 1 steps between grid points.
  x_coef[:-1] = sigma[1:] / sigma[:-1]
  x0_coef[:-1] = -alpha[1:] * np.expm1(-h)
  second_order = np.zeros(n)
  for i in range(1, n - 1):  # The first and the last step are first order.
    ratio = h[i - 1] / h[i]
    second_order[i] = 1.0 / (2.0 * ratio)
  return {"alpha": alpha, "sigma": sigma, "x_coef": x_coef, "x0_coef": x0_coef, "second_order": second_order}


def dpm_solver_pp_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int],
                              rng: jax.Array, *, num_steps: int = 20,
                              noise: jax.Array | None = None, clip_denoised: bool = False) -> jax.Array:
  """DPM-Solver++(2M) sampling with `num_steps` model evaluations; returns x_0.

  Args:
    diffusion: any diffusion built by `create_diffusion`; its ORIGINAL schedule is used (respacing ignored).
    model_fn: (x_t, original t int32 [N]) -> output; with a learned sigma only the epsilon half is used.
    shape: [N, H, W, C].
    rng: key for x_T (unused when `noise` is given; the solver itself is deterministic).
    num_steps: number of solver steps (= model evaluations), 10-25 is typical.
    noise: optional x_T.
    clip_denoised: clip each data prediction x0 to [-1, 1] (static thresholding, for pixel-space models, as
      DDIM/DDPM's `clip_denoised`); off by default, as in DiT's sampling.
  """
  x = _initial_noise(shape, rng, noise)
  timesteps = dpm_solver_timesteps(diffusion.original_num_timesteps, num_steps)
  coefs = dpm_solver_coefficients(diffusion.original_alphas_cumprod, timesteps)
  dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  per_step = {name: jnp.asarray(value, dtype=dtype) for name, value in coefs.items()}
  per_step["t"] = jnp.asarray(timesteps, dtype=jnp.int32)
  channels = x.shape[-1]

  def body(carry, step):
    x, previous_x0 = carry
    t = jnp.full((x.shape[0],), step["t"], dtype=jnp.int32)
    output = model_fn(x, t)
    if output.shape[:-1] != x.shape[:-1] or output.shape[-1] not in (channels, 2 * channels):
      raise ValueError(f"model_fn returned shape {output.shape} for x of shape {x.shape} (NHWC; C or 2C).")
    eps = output[..., :channels]
    x0 = (x - step["sigma"] * eps) / step["alpha"]
    if clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
    direction = x0 + step["second_order"] * (x0 - previous_x0)
    x = step["x_coef"] * x + step["x0_coef"] * direction
    return (x, x0), None

  (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), per_step)
  return x
