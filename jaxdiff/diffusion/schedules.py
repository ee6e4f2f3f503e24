"""Beta schedules, computed in float64 with NumPy (rounding here compounds over T steps)."""

import math

import numpy as np

from jaxdiff.errors import ConfigError

SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """DDPM's schedule: betas evenly spaced from beta_start to beta_end."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_alpha_bar(t: np.ndarray, s: float = 0.008) -> np.ndarray:
  """Improved DDPM's alpha_bar(t) for t in [0, 1]."""
  return np.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Improved DDPM's cosine schedule, betas clipped at max_beta to avoid a singularity at t=T."""
  t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alpha_bar = cosine_alpha_bar(t)
  return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def get_betas(name: str, num_timesteps: int, *, beta_start: float = 1e-4,
              beta_end: float = 0.02) -> np.ndarray:
  """Betas of a named schedule as float64 [num_timesteps]."""
  if num_timesteps < 1:
    raise ConfigError(f"diffusion.num_timesteps must be >= 1, got {num_timesteps}.")
  if name == "linear":
    if not 0 < beta_start <= beta_end < 1:
      raise ConfigError(
          f"diffusion.beta_start/beta_end must satisfy 0 < start <= end < 1, got {beta_start}, {beta_end}.")
    return linear_betas(num_timesteps, beta_start, beta_end)
  if name == "cosine":
    return cosine_betas(num_timesteps)
  raise ConfigError(f"Unknown diffusion.schedule {name!r}: use one of {', '.join(SCHEDULES)}.")
