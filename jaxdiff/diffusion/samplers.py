"""Reverse-process samplers, each one `jax.lax.scan` over the timesteps of a (possibly respaced) process.

A sampler sees the network only through `denoise(x, t) -> model output`, with `t` on the network's (training)
timestep scale, so classifier-free guidance wraps `denoise` without touching the sampler. Classifier guidance is the
optional `guide(x, t) -> s * grad_x log p(y | x, t)` (network timesteps too): it shifts the ancestral mean by
Sigma * guide (guided-diffusion's condition_mean) and, in DDIM and DPM-Solver++, eps by -sqrt(1 - abar) * guide
(condition_score). Every sample draws its noise from its
own key, so a sample does not depend on the batch it was drawn in. Step i of a sampler goes from index i of the
process to index i - 1 (to the data at i = 0); the scan runs i = N-1, ..., 0. DDIM alone lands where the process's
`ddim_*` levels say (diffusers' DDIMScheduler rules and set_alpha_to_one=False may land elsewhere).

Part of a run (img2img and the base -> refiner handoff of SDXL): every sampler takes `x_init` (the state at index
`start`; default x_T drawn from the sample's key), `start` (the first step run; default N - 1) and `stop` (the last
step run; default 0), static Python ints. `step_range` computes them from diffusers' strength / denoising_start /
denoising_end, and `sdedit_init` noises a clean x_0 to index `start` with the noise x_T would have been.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.gaussian import GaussianDiffusion
from jaxdiff.errors import ConfigError

Denoise = Callable[[jax.Array, jax.Array], jax.Array]
Guide = Callable[[jax.Array, jax.Array], jax.Array]
SAMPLERS = ("ancestral", "ddim", "dpm_solver++")


def per_sample_normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A standard normal draw of `shape` for each key: [len(keys), *shape]."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def split_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(keys of x_T, keys of the per-step noise), one of each per sample."""
  init_keys, step_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  return init_keys, step_keys


def step_noise(step_keys: jax.Array, i: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The noise that step i adds to each sample."""
  return per_sample_normal(jax.vmap(jax.random.fold_in, (0, None))(step_keys, i), shape)


class StepRange(NamedTuple):
  """Which steps of a process a run takes (static Python values: one compiled program per setting)."""
  start: int  # the first step index run: the run starts from the state at process index `start`
  stop: int  # the last step index run: the run ends at index stop - 1 (the data for stop = 0)
  add_noise: bool  # an init x_0 is noised to index `start` (SDEdit); False: init latents are used as they are


def _cutoff(num_train_timesteps: int, fraction: float) -> int:
  """diffusers' discrete_timestep_cutoff of a denoising_start / denoising_end fraction (Python's round: to even)."""
  return int(round(num_train_timesteps - fraction * num_train_timesteps))


def step_range(diffusion: GaussianDiffusion, *, num_train_timesteps: int, strength: float = 1.0,
               denoising_start: float = 0.0, denoising_end: float = 1.0) -> StepRange:
  """The steps that StableDiffusionXL(Img2Img)Pipeline runs for these settings, as indices of this process.

  With N steps, `strength` s starts at the int(N * s)-th step from the data (its get_timesteps) and noises the init
  image there. denoising_start d (> 0; strength is then ignored) starts at the highest timestep below
  int(round(T - d * T)) (T = num_train_timesteps of the training process) from init latents as they are;
  denoising_end d (< 1) stops after the lowest timestep at or above int(round(T - d * T)), leaving noisy latents.
  Host-side: reads `diffusion.timestep_map`, so call it outside jit.
  """
  if not 0 < strength <= 1:
    raise ConfigError(f"sample.strength must be in (0, 1], got {strength}.")
  if not 0 <= denoising_start < 1:
    raise ConfigError(f"sample.denoising_start must be in [0, 1), got {denoising_start}.")
  if not 0 < denoising_end <= 1:
    raise ConfigError(f"sample.denoising_end must be in (0, 1], got {denoising_end}.")
  if denoising_start and denoising_end < 1 and denoising_start >= denoising_end:
    raise ConfigError(f"sample.denoising_start={denoising_start} must be below sample.denoising_end={denoising_end}.")
  timesteps = np.asarray(diffusion.timestep_map)  # ascending: index i runs at network timestep timesteps[i]
  n = len(timesteps)
  if denoising_start:
    count = int(np.sum(timesteps < _cutoff(num_train_timesteps, denoising_start)))
    if not count:
      raise ConfigError(f"sample.denoising_start={denoising_start} leaves none of the {n} steps (timesteps "
                        f"{timesteps.min()}..{timesteps.max()}): lower it or change sample.timestep_respacing.")
  else:
    count = min(int(n * strength), n)
    if not count:
      raise ConfigError(f"sample.strength={strength} runs none of the {n} steps: raise it to at least {1 / n:.3g} or "
                        "sample more steps.")
  stop = 0
  if denoising_end < 1:
    kept = np.flatnonzero(timesteps[:count] >= _cutoff(num_train_timesteps, denoising_end))
    if not kept.size:
      raise ConfigError(f"sample.denoising_end={denoising_end} stops before the first of the {count} steps run: "
                        "lower it, or raise sample.strength / lower sample.denoising_start.")
    stop = int(kept[0])
  return StepRange(start=count - 1, stop=stop, add_noise=not denoising_start)


def sdedit_init(diffusion: GaussianDiffusion, keys: jax.Array, x0: jax.Array, start: int) -> jax.Array:
  """x_0 [B, ...] noised to process index `start` (SDEdit), each sample with the noise its key would draw for x_T.

  Jittable; `start` may be traced. The noise is that of diffusers' scheduler.add_noise(x0, noise, timesteps[:1]).
  """
  noise = per_sample_normal(split_keys(keys)[0], x0.shape[1:])
  return diffusion.q_sample(x0.astype(jnp.float32), jnp.full(x0.shape[:1], start, jnp.int32), noise)


def _steps(diffusion: GaussianDiffusion, start: int | None, stop: int) -> tuple[int, int]:
  """(start, stop) checked: N - 1 >= start >= stop >= 0, static ints."""
  n = diffusion.num_timesteps
  start = n - 1 if start is None else start
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, stop)):
    raise ConfigError(f"A sampler's start/stop are static step indices (Python ints), got {start!r}, {stop!r}.")
  if not 0 <= stop <= start < n:
    raise ConfigError(f"A sampler runs steps start..stop with {n - 1} >= start >= stop >= 0, got start={start}, "
                      f"stop={stop}: use samplers.step_range.")
  return int(start), int(stop)


def _initial(keys: jax.Array, sample_shape: tuple[int, ...], x_init: jax.Array | None) -> jax.Array:
  """The state the scan starts from: x_init, or x_T drawn from the sample's key (`split_keys`)."""
  if x_init is None:
    return per_sample_normal(split_keys(keys)[0], sample_shape)
  if tuple(x_init.shape) != (keys.shape[0], *sample_shape):
    raise ConfigError(f"The initial state has shape {tuple(x_init.shape)}, but this run samples "
                      f"{(keys.shape[0], *sample_shape)}: give init images/latents of that size.")
  return jnp.asarray(x_init, jnp.float32)


def _reverse_scan(step, init, start: int, stop: int):
  """Steps i = start, start - 1, ..., stop."""
  carry, _ = jax.lax.scan(lambda c, i: (step(c, i), None), init, jnp.arange(start, stop - 1, -1, dtype=jnp.int32))
  return carry


def _batch_t(x: jax.Array, i: jax.Array) -> jax.Array:
  return jnp.full(x.shape[:1], i, dtype=jnp.int32)


def _levels(diffusion: GaussianDiffusion, i: jax.Array):
  """(alpha, sigma) = (sqrt(abar), sqrt(1 - abar)) at index i and at index i - 1 (the data, (1, 0), for i = 0).

  Read from the arrays computed in float64: 1 - abar formed in float32 loses much of a small beta to cancellation.
  """
  prev = jnp.maximum(i - 1, 0)
  return (diffusion.sqrt_alphas_cumprod[i], diffusion.sqrt_one_minus_alphas_cumprod[i],
          jnp.where(i > 0, diffusion.sqrt_alphas_cumprod[prev], 1.0),
          jnp.where(i > 0, diffusion.sqrt_one_minus_alphas_cumprod[prev], 0.0))


def _condition_score(diffusion: GaussianDiffusion, guide: Guide | None, x, t, x0, eps):
  """(x_0, eps) of the guided score: eps - sqrt(1 - abar) * guide; unchanged without a guide."""
  if guide is None:
    return x0, eps
  eps = eps - diffusion.sqrt_one_minus_alphas_cumprod[t].reshape(-1, *[1] * (x.ndim - 1)) * guide(
      x, diffusion.timestep_map[t])
  return diffusion.predict_x0_from_eps(x, t, eps), eps


def ancestral_sample(diffusion: GaussianDiffusion, denoise: Denoise, keys: jax.Array,
                     sample_shape: tuple[int, ...], *, clip_denoised: bool = True,
                     guide: Guide | None = None, x_init: jax.Array | None = None, start: int | None = None,
                     stop: int = 0) -> jax.Array:
  """DDPM ancestral sampling from x_T ~ N(0, I) down to x_0, one sample per key.

  Args:
    diffusion: the (possibly respaced) process.
    denoise: network output for a batch x_t at network timesteps t.
    keys: [B] PRNG keys, one per sample.
    sample_shape: shape of one sample, e.g. (H, W, C).
    clip_denoised: clip the predicted x_0 to [-1, 1] before forming the posterior mean.
    guide: classifier guidance (see the module docstring), or None.
    x_init: [B, *sample_shape] state at index `start` (e.g. `sdedit_init`), or None: x_T from the keys.
    start, stop: the first and last step run (see the module docstring); None: N - 1.
  """
  start, stop = _steps(diffusion, start, stop)
  _, step_keys = split_keys(keys)

  def step(x, i):
    t = _batch_t(x, i)
    out = diffusion.p_mean_variance(denoise(x, diffusion.timestep_map[t]), x, t, clip_denoised=clip_denoised)
    mean = out.mean if guide is None else out.mean + out.variance * guide(x, diffusion.timestep_map[t])
    # No noise is added at the last step (t == 0).
    std = jnp.where(i > 0, jnp.exp(0.5 * out.log_variance), 0.0)
    return mean + std * step_noise(step_keys, i, sample_shape)

  return _reverse_scan(step, _initial(keys, sample_shape, x_init), start, stop)


def ddim_sample(diffusion: GaussianDiffusion, denoise: Denoise, keys: jax.Array, sample_shape: tuple[int, ...],
                *, eta: float = 0.0, clip_denoised: bool = True, guide: Guide | None = None,
                x_init: jax.Array | None = None, start: int | None = None, stop: int = 0) -> jax.Array:
  """DDIM (Song et al., 2021, eq. 12): eta = 0 is the deterministic ODE path, eta = 1 matches DDPM's variance.

  Arguments as `ancestral_sample`, e.g. x_init = the output of `ddim_invert`; eps is re-derived from the clipped x_0
  prediction (diffusers' use_clipped_model_output=True). Step i lands on `diffusion.ddim_alpha_prev[i]` (the next
  index, or the data, unless diffusers' rules say otherwise), so a run stopping at `stop` ends there.
  """
  start, stop = _steps(diffusion, start, stop)
  _, step_keys = split_keys(keys)

  def step(x, i):
    t = _batch_t(x, i)
    x0, eps = diffusion.pred_x0_eps(denoise(x, diffusion.timestep_map[t]), x, t, clip_denoised=clip_denoised)
    x0, eps = _condition_score(diffusion, guide, x, t, x0, eps)
    alpha_prev, sigma_prev = diffusion.ddim_alpha_prev[i], diffusion.ddim_sigma_prev[i]
    # DDIM's sigma_t(eta)^2 is eta^2 times the posterior variance of the step (0 into the data).
    noise_var = eta ** 2 * diffusion.ddim_variance[i]
    x = alpha_prev * x0 + jnp.sqrt(jnp.maximum(sigma_prev ** 2 - noise_var, 0.0)) * eps
    return x + jnp.sqrt(noise_var) * step_noise(step_keys, i, sample_shape) if eta else x

  return _reverse_scan(step, _initial(keys, sample_shape, x_init), start, stop)


def ddim_invert(diffusion: GaussianDiffusion, denoise: Denoise, x0: jax.Array) -> jax.Array:
  """x_T from x_0 along the deterministic DDIM path, the inverse of `ddim_sample` with eta = 0 up to discretisation.

  Step i goes from index i - 1 (x_0 at i = 0) to index i with eps from the network at index i, evaluated at the
  point it starts from (what DDIM's step i would use at its end point; diffusers' DDIMInverseScheduler does the
  same). No clipping: it would make the path irreversible. Exact for a network that ignores x; otherwise a round
  trip is off by O(1 / steps), and badly near alpha_bar = 0 (the end of the cosine schedule), where sampling divides
  the mismatch by alpha.
  """
  def step(x, i):
    t = _batch_t(x, i)
    _, eps = diffusion.pred_x0_eps(denoise(x, diffusion.timestep_map[t]), x, t, clip_denoised=False)
    alpha, sigma, alpha_prev, sigma_prev = _levels(diffusion, i)
    return alpha * (x - sigma_prev * eps) / alpha_prev + sigma * eps, None

  x_T, _ = jax.lax.scan(step, x0, jnp.arange(diffusion.num_timesteps, dtype=jnp.int32))
  return x_T


def dpm_solver_pp_sample(diffusion: GaussianDiffusion, denoise: Denoise, keys: jax.Array,
                         sample_shape: tuple[int, ...], *, clip_denoised: bool = True,
                         guide: Guide | None = None, x_init: jax.Array | None = None, start: int | None = None,
                         stop: int = 0) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al., 2022): multistep second order in the data prediction, midpoint form.

  The previous x_0 prediction and log-SNR are carried in the scan. The first step run (`start`: no previous x_0, as
  in diffusers' scheduler after img2img slicing) and the step into the data (i = 0, noise level 0, which returns the
  x_0 prediction: final_sigmas_type='zero', whatever the process's set_alpha_to_one) are first order; a run stopping
  at stop > 0 (denoising_end) ends with a second-order step, as diffusers' does. Arguments as `ancestral_sample`;
  clip_denoised clips the data prediction.
  """
  start, stop = _steps(diffusion, start, stop)

  def step(carry, i):
    x, prev_x0, prev_lam = carry
    t = _batch_t(x, i)
    x0, eps = diffusion.pred_x0_eps(denoise(x, diffusion.timestep_map[t]), x, t, clip_denoised=clip_denoised)
    x0, _ = _condition_score(diffusion, guide, x, t, x0, eps)
    alpha_s, sigma_s, alpha_t, sigma_t = _levels(diffusion, i)
    # lambda = log(alpha / sigma) is +inf at the data (i = 0), where the update returns x0.
    lam_s = jnp.log(alpha_s) - jnp.log(sigma_s)
    h = jnp.log(alpha_t) - jnp.log(sigma_t) - lam_s
    r = (lam_s - prev_lam) / h
    first_order = (i == start) | (i == 0)
    d = jnp.where(first_order, x0, x0 + (x0 - prev_x0) / (2 * r))
    x = sigma_t / sigma_s * x - alpha_t * jnp.expm1(-h) * d
    return x, x0, lam_s

  x_init = _initial(keys, sample_shape, x_init)
  x, _, _ = _reverse_scan(step, (x_init, jnp.zeros_like(x_init), jnp.zeros((), jnp.float32)), start, stop)
  return x


def get_sampler(name: str, *, eta: float = 0.0):
  """The sampler `sample.sampler` names, as f(diffusion, denoise, keys, sample_shape, *, clip_denoised, guide, x_init,
  start, stop)."""
  if name == "ancestral":
    return ancestral_sample
  if name == "ddim":
    if eta < 0:
      raise ConfigError(f"sample.eta must be >= 0, got {eta}.")
    return functools.partial(ddim_sample, eta=eta)
  if name == "dpm_solver++":
    return dpm_solver_pp_sample
  raise ConfigError(f"Unknown sample.sampler {name!r}: use one of {', '.join(SAMPLERS)}.")
