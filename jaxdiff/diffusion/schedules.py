"""Beta schedules and timestep respacing, computed in float64 with NumPy (rounding here compounds over T steps)."""

import math

import numpy as np

from jaxdiff.errors import ConfigError

SCHEDULES = ("linear", "cosine", "scaled_linear")
# diffusers' `timestep_spacing` values, written "leadingN", "trailingN" or "linspaceN" in sample.timestep_respacing.
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
# Whose `set_timesteps` rules each jaxdiff sampler follows for those forms.
DIFFUSERS_SCHEDULERS = {"ancestral": "DDPMScheduler", "ddim": "DDIMScheduler",
                        "dpm_solver++": "DPMSolverMultistepScheduler"}


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """DDPM's schedule: betas evenly spaced from beta_start to beta_end."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Latent/Stable Diffusion's schedule (diffusers' "scaled_linear"): sqrt(beta) evenly spaced.

  Float64 here; diffusers forms it in float32, whose alphas_cumprod differs from this by up to ~1e-6 relative at
  SD's settings (0.00085, 0.012, T=1000; tests/test_parity_schedulers.py measures it).
  """
  return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64) ** 2


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
  if name in ("linear", "scaled_linear"):
    if not 0 < beta_start <= beta_end < 1:
      raise ConfigError(
          f"diffusion.beta_start/beta_end must satisfy 0 < start <= end < 1, got {beta_start}, {beta_end}.")
    make = linear_betas if name == "linear" else scaled_linear_betas
    return make(num_timesteps, beta_start, beta_end)
  if name == "cosine":
    return cosine_betas(num_timesteps)
  raise ConfigError(f"Unknown diffusion.schedule {name!r}: use one of {', '.join(SCHEDULES)}.")


def space_timesteps(num_timesteps: int, respacing: str, *, sampler: str = "ddim",
                    steps_offset: int = 0) -> np.ndarray:
  """The sorted timesteps of a T-step process that a respaced process keeps.

  `respacing` is "" (keep all), "N" or "N1,N2,..." (N_i steps evenly spaced, rounded, over the i-th of equal sections
  of [0, T)), or "ddimN" (the DDIM paper's integer stride: 0, s, 2s, ... with exactly N steps); improved DDPM's rules.
  "leadingN", "trailingN" and "linspaceN" are the N timesteps that diffusers' scheduler of `sampler`
  (DIFFUSERS_SCHEDULERS) visits after `set_timesteps(N)` with that `timestep_spacing`; `steps_offset` is its
  `steps_offset`, which, as in diffusers, shifts "leadingN" alone (the other forms ignore it).
  """
  if not respacing:
    return np.arange(num_timesteps)
  spacing, steps = parse_diffusers_spacing(respacing)
  if spacing:
    return np.sort(diffusers_timesteps(spacing, num_timesteps, steps, sampler=sampler, steps_offset=steps_offset))
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


def parse_diffusers_spacing(respacing: str) -> tuple[str, int]:
  """("leading" | "trailing" | "linspace", N) of a diffusers form such as "leading50"; ("", 0) for other forms."""
  for spacing in DIFFUSERS_SPACINGS:
    if respacing.startswith(spacing):
      return spacing, _parse_count(respacing[len(spacing):], respacing)
  return "", 0


def diffusers_timesteps(spacing: str, num_timesteps: int, steps: int, *, sampler: str,
                        steps_offset: int = 0) -> np.ndarray:
  """The descending timesteps of diffusers' `set_timesteps(steps)` with `timestep_spacing=spacing`, for the scheduler
  that `sampler` follows, in its NumPy arithmetic (np.round rounds half to even).

  DDPMScheduler/DDIMScheduler space `steps` points over [0, T); DPMSolverMultistepScheduler spaces `steps + 1` and
  drops timestep 0 (it steps to sigma 0 instead). Refuses what diffusers would run wrongly: repeated timesteps, or
  any outside [0, T) (e.g. "trailing61" of 1000 steps ends at -1).
  """
  if sampler not in DIFFUSERS_SCHEDULERS:
    raise ConfigError(f"Unknown sample.sampler {sampler!r}: use one of {', '.join(DIFFUSERS_SCHEDULERS)}.")
  points = steps + 1 if sampler == "dpm_solver++" else steps
  if spacing == "linspace":
    timesteps = np.linspace(0, num_timesteps - 1, points).round()[::-1][:steps]
  elif spacing == "leading":
    ratio = num_timesteps // points
    timesteps = (np.arange(0, points) * ratio).round()[::-1][:steps] + steps_offset
  elif spacing == "trailing":
    timesteps = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)) - 1
  else:
    raise ConfigError(f"Unknown timestep spacing {spacing!r}: use one of {', '.join(DIFFUSERS_SPACINGS)}.")
  timesteps = timesteps.astype(np.int64)
  if (len(np.unique(timesteps)) != len(timesteps) or timesteps.min() < 0 or timesteps.max() >= num_timesteps):
    raise ConfigError(f"sample.timestep_respacing={spacing}{steps} (sample.steps_offset={steps_offset}): diffusers' "
                      f"{DIFFUSERS_SCHEDULERS[sampler]} would visit timesteps {timesteps.tolist()[-4:]}..., not "
                      f"{steps} distinct ones in [0, {num_timesteps}); use another step count or spacing.")
  return timesteps


def ddim_target_timesteps(num_timesteps: int, respacing: str, kept: np.ndarray) -> np.ndarray:
  """The training timestep each DDIM step i (from kept[i]) lands on; -1 for the final level (alpha_bar 1, or
  alphas_cumprod[0] where sample.set_alpha_to_one=False).

  The step before, kept[i - 1], for jaxdiff's forms. diffusers' DDIMScheduler steps from t to t - T // N whatever
  its spacing: the step before for "leadingN" (and "trailingN" where N divides T), elsewhere a level the next step
  does not start from (e.g. "linspace10" of 1000 steps goes from 999 to 899, then evaluates the network at 888).
  """
  spacing, steps = parse_diffusers_spacing(respacing)
  if spacing:
    target = kept - num_timesteps // steps
  else:
    target = np.append(-1, kept[:-1])
  return np.where(target >= 0, target, -1)


def _parse_count(text: str, respacing: str) -> int:
  if not text.strip().isdigit() or int(text) < 1:
    raise ConfigError(f"sample.timestep_respacing={respacing!r}: use '', 'N', 'N1,N2,...', 'ddimN', 'leadingN', "
                      "'trailingN' or 'linspaceN' with positive integers.")
  return int(text)


def respace_betas(betas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
  """Betas of the process that visits only `timesteps`, with the same alphas_cumprod there."""
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, np.float64))[timesteps]
  return 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
