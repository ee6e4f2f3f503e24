"""Beta schedules and timestep respacing, computed in float64 with NumPy (rounding here compounds over T steps)."""

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


def space_timesteps(num_timesteps: int, respacing: str) -> np.ndarray:
  """The sorted timesteps of a T-step process that a respaced process keeps.

  `respacing` is "" (keep all), "N" or "N1,N2,..." (N_i steps evenly spaced, rounded, over the i-th of equal sections
  of [0, T)), or "ddimN" (the DDIM paper's integer stride: 0, s, 2s, ... with exactly N steps); improved DDPM's rules.
  """
  if not respacing:
    return np.arange(num_timesteps)
  if respacing.startswith("ddim"):
    count = _parse_count(respacing[len("ddim"):], respacing)
    for stride in range(1, num_timesteps + 1):
      if len(range(0, num_timesteps, stride)) == count:
        return np.arange(0, num_timesteps, stride)
    raise ConfigError(f"sample.timestep_respacing={respacing!r}: no integer stride gives exactly {count} of "
                      f"{num_timesteps} steps; use a plain count such as {count!r}.")
  counts = [_parse_count(c, respacing) for c in respacing.split(",")]
  size_per, extra = divmod(num_timesteps, len(counts))
  start, kept = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if count > size:
      raise ConfigError(f"sample.timestep_respacing={respacing!r}: a section of {size} steps cannot hold {count}.")
    stride = (size - 1) / (count - 1) if count > 1 else 1
    # Accumulated as improved DDPM does: j * stride rounds differently at some ties (T=50, "25" keeps 25, not 24).
    position = 0.0
    for _ in range(count):
      kept.append(start + round(position))
      position += stride
    start += size
  return np.array(sorted(set(kept)))


def _parse_count(text: str, respacing: str) -> int:
  if not text.strip().isdigit() or int(text) < 1:
    raise ConfigError(f"sample.timestep_respacing={respacing!r}: use '', 'N', 'N1,N2,...' or 'ddimN' with "
                      "positive integers.")
  return int(text)


def respace_betas(betas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
  """Betas of the process that visits only `timesteps`, with the same alphas_cumprod there."""
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, np.float64))[timesteps]
  return 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
