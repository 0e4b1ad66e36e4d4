"""The Gaussian diffusion of DiT/DiG in JAX: schedule tables, forward process, model posterior and the loss.

DiG's `diffusion/` package is byte-identical to DiT's (facebookresearch/DiT), which in turn is OpenAI's
improved-diffusion code. This module re-implements the same maths (facts, not code) as pure, jittable JAX:

- Tables (alphas_cumprod, posterior coefficients, ...) are computed once in float64 NumPy and kept as float32
  jnp arrays for the device, as DiT gathers float64 tables and casts to float32. When x itself is float64
  (under `jax.experimental.enable_x64`) the float64 tables are used, so closed forms can be tested exactly.
- Mean type is epsilon. Variance: LEARNED_RANGE when learning sigma (log var = f log beta_t + (1-f) log
  beta~_t(clipped), f = (v + 1)/2), else FIXED_SMALL (posterior variance) or FIXED_LARGE (betas, with
  beta~_1 at t = 0).
- Loss MSE on epsilon, plus, when sigma is learned, the VB term in bits/dim computed with the epsilon half
  stop-gradiented (so it trains only the variance); VB is the KL to the true posterior for t > 0 and the
  discretised-Gaussian decoder NLL at t = 0. RESCALED_MSE multiplies VB by T/1000; KL/RESCALED_KL train on
  VB alone (times T when rescaled).
- Respacing works like DiT's SpacedDiffusion: betas are recomputed from alphas_cumprod at the kept steps, and
  the model is always called with the ORIGINAL timestep indices (respaced index -> original t is mapped here,
  as DiT's model wrapper does). All public methods take respaced indices t in [0, num_timesteps).

Layout is NHWC: x is [N, H, W, C]; a learned-sigma model returns [N, H, W, 2C] with epsilon in the first C
channels and the variance value v in [-1, 1] in the last C.

Deliberate deviations from DiT: no `predict_xstart`/START_X or PREVIOUS_X mean types, no plain LEARNED
variance (DiT's `create_diffusion` never builds those for DiG); `model_kwargs` are gone (the caller closes
over labels in `model_fn`); noise and RNG keys are explicit arguments; samplers are `lax.scan` loops.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dig_jax.diffusion import losses
from dig_jax.diffusion import samplers
from dig_jax.diffusion import schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class ModelVarType(enum.Enum):
  LEARNED_RANGE = "learned_range"
  FIXED_SMALL = "fixed_small"
  FIXED_LARGE = "fixed_large"


class LossType(enum.Enum):
  MSE = "mse"
  RESCALED_MSE = "rescaled_mse"
  KL = "kl"
  RESCALED_KL = "rescaled_kl"


_TABLE_NAMES = (
    "betas", "log_betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "fixed_variance", "fixed_log_variance",
)


def _schedule_tables(betas: np.ndarray, model_var_type: ModelVarType) -> dict[str, np.ndarray]:
  """All float64 per-step tables of a process with the given betas."""
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  abar_next = np.concatenate([abar[1:], [0.0]])
  posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
  # posterior_variance[0] is 0; the clipped log uses the t = 1 value there.
  posterior_log_variance_clipped = np.log(np.concatenate([posterior_variance[1:2], posterior_variance[1:]]))
  if model_var_type == ModelVarType.FIXED_LARGE:
    fixed_variance = np.concatenate([posterior_variance[1:2], betas[1:]])
    fixed_log_variance = np.log(fixed_variance)
  else:  # FIXED_SMALL; for LEARNED_RANGE these are unused.
    fixed_variance = posterior_variance
    fixed_log_variance = posterior_log_variance_clipped
  return {
      "betas": betas,
      "log_betas": np.log(betas),
      "alphas_cumprod": abar,
      "alphas_cumprod_prev": abar_prev,
      "alphas_cumprod_next": abar_next,
      "sqrt_alphas_cumprod": np.sqrt(abar),
      "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
      "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
      "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
      "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
      "posterior_variance": posterior_variance,
      "posterior_log_variance_clipped": posterior_log_variance_clipped,
      "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
      "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
      "fixed_variance": fixed_variance,
      "fixed_log_variance": fixed_log_variance,
  }


class GaussianDiffusion:
  """DiT's (spaced) Gaussian diffusion. Build it with `create_diffusion`.

  Attributes:
    num_timesteps: number of (respaced) steps; public methods take t in [0, num_timesteps).
    timestep_map: int64 NumPy array, respaced index -> original step index passed to the model.
    original_num_timesteps: T of the original process.
    original_alphas_cumprod: float64 NumPy alphas_cumprod of the original process.
    tables64: dict of float64 NumPy tables of the respaced process; the same names exist as float32 jnp
      attributes (e.g. `self.alphas_cumprod`).
  """

  def __init__(self, original_betas: np.ndarray, *, model_var_type: ModelVarType, loss_type: LossType,
               use_timesteps: Sequence[int] | None = None, min_snr_gamma: float = 0.0):
    original_betas = np.asarray(original_betas, dtype=np.float64)
    if original_betas.ndim != 1 or not np.all((original_betas > 0) & (original_betas <= 1)):
      raise ValueError("betas must be a 1-D array with values in (0, 1].")
    if use_timesteps is None:
      use_timesteps = range(len(original_betas))
    kept = np.asarray(sorted(set(int(s) for s in use_timesteps)), dtype=np.int64)
    if len(kept) < 2 or kept[0] < 0 or kept[-1] >= len(original_betas):
      raise ValueError(f"Need at least 2 kept steps inside [0, {len(original_betas)}), got {len(kept)}.")
    if min_snr_gamma < 0:
      raise ValueError(f"min_snr_gamma must be >= 0 (0 = off), got {min_snr_gamma}.")
    self.model_var_type = model_var_type
    self.loss_type = loss_type
    self.min_snr_gamma = float(min_snr_gamma)
    self.original_num_timesteps = len(original_betas)
    self.original_betas = original_betas
    self.original_alphas_cumprod = np.cumprod(1.0 - original_betas)
    self.timestep_map = kept
    self.num_timesteps = len(kept)
    self.tables64 = _schedule_tables(schedule.respace_betas(original_betas, kept), model_var_type)

  @functools.cached_property
  def _tables32(self) -> dict[str, jax.Array]:
    # Built on first use, not in __init__, so that constructing a diffusion does not start a JAX backend
    # (jax.distributed.initialize must come first); eager even when first used inside a jit trace.
    with jax.ensure_compile_time_eval():
      return {name: jnp.asarray(value, dtype=jnp.float32) for name, value in self.tables64.items()}

  @functools.cached_property
  def _timestep_map32(self) -> jax.Array:
    with jax.ensure_compile_time_eval():
      return jnp.asarray(self.timestep_map, dtype=jnp.int32)

  def __getattr__(self, name: str):
    # Float32 device tables, e.g. `diffusion.alphas_cumprod`.
    if name in _TABLE_NAMES:
      return self._tables32[name]
    raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

  @functools.cached_property
  def _min_snr_weights32(self) -> jax.Array:
    """Min-SNR-gamma weight of the epsilon MSE per step: min(SNR, gamma) / SNR with SNR = abar / (1 - abar).

    Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556) caps the weight of the low-noise steps, whose epsilon
    targets are easy but dominate the gradient; it converges several times faster. For epsilon prediction the
    x0-space weight min(SNR, gamma) becomes min(SNR, gamma) / SNR. Off (gamma = 0) in the paper's recipe.
    Computed in float64: 1 - abar in float32 loses most digits at t = 0 (abar = 0.9999).
    """
    abar = self.tables64["alphas_cumprod"]
    snr = abar / (1.0 - abar)
    with jax.ensure_compile_time_eval():
      return jnp.asarray(np.minimum(snr, self.min_snr_gamma) / snr, dtype=jnp.float32)

  @property
  def learn_sigma(self) -> bool:
    return self.model_var_type == ModelVarType.LEARNED_RANGE

  # ---------------------------------------------------------------- helpers

  def _coef(self, name: str, t: jax.Array, like: jax.Array) -> jax.Array:
    """Table `name` gathered at t and shaped [N, 1, ..., 1] to broadcast against `like`."""
    if like.dtype == jnp.float64:
      values = jnp.asarray(self.tables64[name])[t]
    else:
      values = self._tables32[name][t]
    return values.reshape(values.shape + (1,) * (like.ndim - 1))

  def original_timesteps(self, t: jax.Array) -> jax.Array:
    """Maps respaced indices [N] to the original step indices the model was trained with (int32)."""
    return self._timestep_map32[t]

  def call_model(self, model_fn: ModelFn, x: jax.Array, t: jax.Array) -> jax.Array:
    """Calls model_fn with the original timesteps and checks the output's channel count."""
    output = model_fn(x, self.original_timesteps(t))
    expected = x.shape[-1] * (2 if self.learn_sigma else 1)
    if output.shape[:-1] != x.shape[:-1] or output.shape[-1] != expected:
      raise ValueError(f"model_fn returned shape {output.shape}; expected {x.shape[:-1] + (expected,)} "
                       f"(learn_sigma={self.learn_sigma}, NHWC layout).")
    return output

  def split_output(self, output: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Splits a model output into (epsilon, variance values or None)."""
    if self.learn_sigma:
      eps, var_values = jnp.split(output, 2, axis=-1)
      return eps, var_values
    return output, None

  def predict_xstart_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

  def predict_eps_from_xstart(self, x_t: jax.Array, t: jax.Array, pred_xstart: jax.Array) -> jax.Array:
    return ((self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
            / self._coef("sqrt_recipm1_alphas_cumprod", t, x_t))

  # ---------------------------------------------------------------- forward process

  def q_mean_variance(self, x_start: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and log-variance of q(x_t | x_0)."""
    mean = self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
    variance = 1.0 - self._coef("alphas_cumprod", t, x_start)
    log_variance = self._coef("log_one_minus_alphas_cumprod", t, x_start)
    return mean, jnp.broadcast_to(variance, x_start.shape), jnp.broadcast_to(log_variance, x_start.shape)

  def q_sample(self, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Draws x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) using the given noise."""
    return (self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

  def q_posterior_mean_variance(self, x_start: jax.Array, x_t: jax.Array,
                                t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 7)."""
    mean = (self._coef("posterior_mean_coef1", t, x_t) * x_start
            + self._coef("posterior_mean_coef2", t, x_t) * x_t)
    variance = jnp.broadcast_to(self._coef("posterior_variance", t, x_t), x_t.shape)
    log_variance = jnp.broadcast_to(self._coef("posterior_log_variance_clipped", t, x_t), x_t.shape)
    return mean, variance, log_variance

  # ---------------------------------------------------------------- reverse process

  def p_mean_variance_from_output(self, output: jax.Array, x: jax.Array, t: jax.Array,
                                  clip_denoised: bool = False) -> dict[str, jax.Array]:
    """p(x_{t-1} | x_t) from an already computed model output (see `p_mean_variance`)."""
    eps, var_values = self.split_output(output)
    if self.learn_sigma:
      min_log = self._coef("posterior_log_variance_clipped", t, x)
      max_log = self._coef("log_betas", t, x)
      frac = (var_values + 1.0) / 2.0
      log_variance = frac * max_log + (1.0 - frac) * min_log
      variance = jnp.exp(log_variance)
    else:
      variance = jnp.broadcast_to(self._coef("fixed_variance", t, x), x.shape)
      log_variance = jnp.broadcast_to(self._coef("fixed_log_variance", t, x), x.shape)
    pred_xstart = self.predict_xstart_from_eps(x, t, eps)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart,
            "eps": eps}

  def p_mean_variance(self, model_fn: ModelFn, x: jax.Array, t: jax.Array,
                      clip_denoised: bool = False) -> dict[str, jax.Array]:
    """Applies the model: returns dict(mean, variance, log_variance, pred_xstart, eps) of p(x_{t-1}|x_t).

    Args:
      model_fn: (x_t [N,H,W,C], original t [N] int32) -> [N,H,W,C] or [N,H,W,2C].
      x: x_t, [N, H, W, C].
      t: respaced step indices, [N] int.
      clip_denoised: clip the predicted x_0 to [-1, 1].
    """
    return self.p_mean_variance_from_output(self.call_model(model_fn, x, t), x, t, clip_denoised)

  # ---------------------------------------------------------------- losses

  def vb_terms_from_output(self, output: jax.Array, x_start: jax.Array, x_t: jax.Array, t: jax.Array,
                           clip_denoised: bool = False) -> dict[str, jax.Array]:
    """VB term in bits/dim per example: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, decoder NLL at t = 0."""
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance_from_output(output, x_t, t, clip_denoised)
    kl = losses.mean_flat(losses.normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
    decoder_nll = -losses.discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
    decoder_nll = losses.mean_flat(decoder_nll)
    bits = jnp.where(t == 0, decoder_nll, kl) / np.log(2.0)
    return {"output": bits, "pred_xstart": out["pred_xstart"]}

  def vb_terms_bpd(self, model_fn: ModelFn, x_start: jax.Array, x_t: jax.Array, t: jax.Array,
                   clip_denoised: bool = False) -> dict[str, jax.Array]:
    """`vb_terms_from_output` with the model applied."""
    return self.vb_terms_from_output(self.call_model(model_fn, x_t, t), x_start, x_t, t, clip_denoised)

  def training_losses(self, model_fn: ModelFn, x_start: jax.Array, t: jax.Array,
                      noise: jax.Array) -> dict[str, jax.Array]:
    """DiT's training loss for one batch. Pure and jittable.

    Args:
      model_fn: the model (see `p_mean_variance`); gradients flow into whatever it closes over.
      x_start: clean data x_0, [N, H, W, C].
      t: respaced step indices, [N] int (use `sample_timesteps`).
      noise: standard normal noise shaped like x_start.

    Returns:
      dict with "loss", "mse" and "vb", each [N]; "vb" is zero when sigma is fixed, "mse" zero for KL losses.
    """
    x_t = self.q_sample(x_start, t, noise)
    zeros = jnp.zeros(x_start.shape[:1], dtype=x_start.dtype)
    if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
      vb = self.vb_terms_bpd(model_fn, x_start, x_t, t)["output"]
      scale = self.num_timesteps if self.loss_type == LossType.RESCALED_KL else 1.0
      return {"loss": vb * scale, "mse": zeros, "vb": vb}
    output = self.call_model(model_fn, x_t, t)
    eps, var_values = self.split_output(output)
    mse = losses.mean_flat(jnp.square(noise - eps))
    if self.min_snr_gamma:
      mse = mse * self._min_snr_weights32[t].astype(mse.dtype)
    if not self.learn_sigma:
      return {"loss": mse, "mse": mse, "vb": zeros}
    # VB trains only the variance: the epsilon half enters it stop-gradiented.
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
    vb = self.vb_terms_from_output(frozen, x_start, x_t, t)["output"]
    if self.loss_type == LossType.RESCALED_MSE:
      vb = vb * (self.num_timesteps / 1000.0)
    return {"loss": mse + vb, "mse": mse, "vb": vb}

  # ---------------------------------------------------------------- samplers (see samplers.py)

  def p_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, rng: jax.Array,
               clip_denoised: bool = False) -> dict[str, jax.Array]:
    """One ancestral step x_t -> x_{t-1}; no noise is added where t == 0."""
    out = self.p_mean_variance(model_fn, x, t, clip_denoised)
    noise = jax.random.normal(rng, x.shape, x.dtype)
    nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}

  def ddim_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, rng: jax.Array, eta: float = 0.0,
                  clip_denoised: bool = False) -> dict[str, jax.Array]:
    """One DDIM step x_t -> x_{t-1} (Song et al. eq. 12); uses only the epsilon half of the output."""
    out = self.p_mean_variance(model_fn, x, t, clip_denoised)
    eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
    abar = self._coef("alphas_cumprod", t, x)
    abar_prev = self._coef("alphas_cumprod_prev", t, x)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    mean = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1.0 - abar_prev - sigma ** 2) * eps
    nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    sample = mean + nonzero * sigma * jax.random.normal(rng, x.shape, x.dtype)
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}

  def p_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], rng: jax.Array, *,
                    clip_denoised: bool = False, noise: jax.Array | None = None) -> jax.Array:
    """Ancestral DDPM sampling over all (respaced) steps; returns x_0. See `samplers.p_sample_loop`."""
    return samplers.p_sample_loop(self, model_fn, shape, rng, clip_denoised=clip_denoised, noise=noise)

  def ddim_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], rng: jax.Array, *, eta: float = 0.0,
                       clip_denoised: bool = False, noise: jax.Array | None = None) -> jax.Array:
    """DDIM sampling over all (respaced) steps; returns x_0. See `samplers.ddim_sample_loop`."""
    return samplers.ddim_sample_loop(self, model_fn, shape, rng, eta=eta, clip_denoised=clip_denoised,
                                     noise=noise)

  def dpm_solver_pp_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], rng: jax.Array, *,
                                num_steps: int = 20, noise: jax.Array | None = None,
                                clip_denoised: bool = False) -> jax.Array:
    """DPM-Solver++(2M) on the ORIGINAL schedule; returns x_0. See `samplers.dpm_solver_pp_sample_loop`."""
    return samplers.dpm_solver_pp_sample_loop(self, model_fn, shape, rng, num_steps=num_steps, noise=noise,
                                              clip_denoised=clip_denoised)


def create_diffusion(timestep_respacing: str | int | None = "", *, num_timesteps: int = 1000,
                     noise_schedule: str = "linear", learn_sigma: bool = True, sigma_small: bool = False,
                     use_kl: bool = False, rescale_learned_sigmas: bool = False,
                     min_snr_gamma: float = 0.0) -> GaussianDiffusion:
  """Builds DiT's diffusion: `create_diffusion("")` for training, `create_diffusion("250")` for sampling.

  Args:
    timestep_respacing: "" or None (all steps), an int or "N" (N evenly spaced steps), "a,b,..." (per-section
      counts) or "ddimN" (N steps with a constant stride).
    num_timesteps: T of the original process (DiT's `diffusion_steps`).
    noise_schedule: "linear" or "squaredcos_cap_v2".
    learn_sigma: model outputs 2C channels (epsilon, variance value) and the variance is LEARNED_RANGE.
    sigma_small: with fixed sigma, use the posterior variance (FIXED_SMALL) instead of betas (FIXED_LARGE).
    use_kl: train on the VB alone, times T (RESCALED_KL).
    rescale_learned_sigmas: multiply the VB term by T/1000 (RESCALED_MSE).
    min_snr_gamma: > 0 weights the epsilon MSE by Min-SNR-gamma (see `_min_snr_weights32`); 0 = off.
  """
  betas = schedule.get_named_beta_schedule(noise_schedule, num_timesteps)
  if use_kl:
    loss_type = LossType.RESCALED_KL
  elif rescale_learned_sigmas:
    loss_type = LossType.RESCALED_MSE
  else:
    loss_type = LossType.MSE
  if learn_sigma:
    var_type = ModelVarType.LEARNED_RANGE
  else:
    var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
  kept = schedule.space_timesteps(num_timesteps, timestep_respacing)
  return GaussianDiffusion(betas, model_var_type=var_type, loss_type=loss_type, use_timesteps=kept,
                           min_snr_gamma=min_snr_gamma)


def sample_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
  """Uniform training timesteps in [0, num_timesteps), int32 [batch_size]."""
  return jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
