"""DiT/DiG Gaussian diffusion in JAX: schedules, the training loss, and DDPM / DDIM / DPM-Solver++ samplers.

Follows facebookresearch/DiT's `diffusion/` package (which DiG ships byte-identical); see
`gaussian_diffusion.py` for the facts carried over and the deliberate deviations. The diffusion never imports
the models: it takes `model_fn(x_t [N,H,W,C], t [N] int32) -> output`.
"""

from dig_jax.diffusion.gaussian_diffusion import create_diffusion
from dig_jax.diffusion.gaussian_diffusion import GaussianDiffusion
from dig_jax.diffusion.gaussian_diffusion import LossType
from dig_jax.diffusion.gaussian_diffusion import ModelFn
from dig_jax.diffusion.gaussian_diffusion import ModelVarType
from dig_jax.diffusion.gaussian_diffusion import sample_timesteps
from dig_jax.diffusion.losses import discretized_gaussian_log_likelihood
from dig_jax.diffusion.losses import mean_flat
from dig_jax.diffusion.losses import normal_kl
from dig_jax.diffusion.samplers import ddim_sample_loop
from dig_jax.diffusion.samplers import dpm_solver_pp_sample_loop
from dig_jax.diffusion.samplers import p_sample_loop
from dig_jax.diffusion.schedule import get_named_beta_schedule
from dig_jax.diffusion.schedule import space_timesteps

__all__ = [
    "create_diffusion", "GaussianDiffusion", "LossType", "ModelFn", "ModelVarType", "sample_timesteps",
    "discretized_gaussian_log_likelihood", "mean_flat", "normal_kl", "ddim_sample_loop",
    "dpm_solver_pp_sample_loop", "p_sample_loop", "get_named_beta_schedule", "space_timesteps",
]
