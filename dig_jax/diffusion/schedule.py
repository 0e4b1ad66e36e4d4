"""Noise schedules and timestep respacing for the DiT/DiG Gaussian diffusion (host-side, float64 NumPy).

Everything here runs once at set-up on the host, in float64, exactly as DiT's diffusion package does; the
resulting tables are later cast to float32 for the device. Facts carried over from DiT (`diffusion/`,
itself from OpenAI's improved/guided diffusion):

- "linear": betas = linspace(scale * 1e-4, scale * 0.02, T) with scale = 1000 / T, so that any T gives a
  schedule shaped like the 1000-step one.
- "squaredcos_cap_v2": the cosine schedule of Nichol & Dhariwal, betas_t = min(1 - abar(t+1)/abar(t), 0.999)
  with abar(s) = cos((s/T + 0.008) / 1.008 * pi/2)^2.
- Respacing keeps a subset of the original steps. A string "ddimN" keeps range(0, T, stride) with exactly N
  entries; otherwise a comma list "a,b,..." splits [0, T) into equal sections and takes evenly strided
  (Python-`round`ed) indices inside each. The respaced betas are recomputed from alphas_cumprod at the kept
  steps, so the respaced process has the same marginals q(x_t | x_0) at those steps.

Deviation: an int is accepted for the respacing (same as its decimal string), and None/"" mean "all steps".
"""

from __future__ import annotations

import math

import numpy as np

_SCHEDULES = ("linear", "squaredcos_cap_v2")


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """Returns the float64 betas of the named schedule with `num_timesteps` steps."""
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}.")
  if name == "linear":
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
  if name == "squaredcos_cap_v2":
    return betas_for_alpha_bar(
        num_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2, max_beta=0.999)
  raise ValueError(f"Unknown noise_schedule {name!r}; use one of {_SCHEDULES}.")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
  """Discretises a continuous alpha_bar(s), s in [0, 1], into `num_timesteps` betas (capped at max_beta)."""
  betas = []
  for i in range(num_timesteps):
    s_now, s_next = i / num_timesteps, (i + 1) / num_timesteps
    betas.append(min(1.0 - alpha_bar(s_next) / alpha_bar(s_now), max_beta))
  return np.asarray(betas, dtype=np.float64)


def _parse_respacing(timestep_respacing: str | int | None, num_timesteps: int) -> str:
  if timestep_respacing is None or timestep_respacing == "":
    return str(num_timesteps)
  if isinstance(timestep_respacing, bool):
    raise ValueError(f"timestep_respacing must be a str or int, got {timestep_respacing!r}.")
  if isinstance(timestep_respacing, (int, np.integer)):
    return str(int(timestep_respacing))
  if isinstance(timestep_respacing, str):
    return timestep_respacing.strip()
  raise ValueError(f"timestep_respacing must be a str, int or None, got {type(timestep_respacing).__name__}.")


def space_timesteps(num_timesteps: int, timestep_respacing: str | int | None) -> list[int]:
  """Returns the sorted original step indices kept by a respacing spec.

  Args:
    num_timesteps: T of the original process.
    timestep_respacing: "" / None (all steps), an int N, "N", "a,b,c" (per-section counts) or "ddimN".

  Raises:
    ValueError: for a malformed spec or one asking for more steps than a section has.
  """
  spec = _parse_respacing(timestep_respacing, num_timesteps)
  if spec.startswith("ddim"):
    try:
      desired = int(spec[len("ddim"):])
    except ValueError as e:
      raise ValueError(f"Bad respacing {spec!r}: expected 'ddimN' with an integer N.") from e
    for stride in range(1, num_timesteps):
      if len(range(0, num_timesteps, stride)) == desired:
        return list(range(0, num_timesteps, stride))
    if desired == num_timesteps:
      return list(range(num_timesteps))
    raise ValueError(f"Cannot make exactly {desired} equally strided steps out of {num_timesteps} "
                     f"(respacing {spec!r}); pick another count or use a plain number.")
  try:
    section_counts = [int(c) for c in spec.split(",")]
  except ValueError as e:
    raise ValueError(f"Bad respacing {spec!r}: expected '', an integer, 'a,b,...' or 'ddimN'.") from e
  if any(c < 1 for c in section_counts):
    raise ValueError(f"Bad respacing {spec!r}: every section count must be >= 1.")

  size_per_section, extra = divmod(num_timesteps, len(section_counts))
  kept: set[int] = set()
  section_start = 0
  for i, count in enumerate(section_counts):
    size = size_per_section + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"Respacing {spec!r} asks for {count} steps from a section of only {size} "
                       f"(num_timesteps={num_timesteps}).")
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    position = 0.0
    for _ in range(count):
      kept.add(section_start + round(position))
      position += stride
    section_start += size
  return sorted(kept)


def respace_betas(betas: np.ndarray, kept_steps: list[int] | np.ndarray) -> np.ndarray:
  """Betas of the respaced process: beta'_k = 1 - abar[s_k] / abar[s_{k-1}] (abar[s_{-1}] = 1)."""
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
  kept_abar = alphas_cumprod[np.asarray(kept_steps, dtype=np.int64)]
  previous = np.concatenate([[1.0], kept_abar[:-1]])
  return 1.0 - kept_abar / previous
