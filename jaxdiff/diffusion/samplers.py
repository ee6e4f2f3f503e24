"""Reverse-process samplers, each one `jax.lax.scan` over the timesteps of a (possibly respaced) process.

A sampler sees the network only through `denoise(x, t) -> model output`, with `t` on the network's (training)
timestep scale, so classifier-free guidance wraps `denoise` without touching the sampler. Classifier guidance is the
optional `guide(x, t) -> s * grad_x log p(y | x, t)` (network timesteps too): it shifts the ancestral mean by
Sigma * guide (guided-diffusion's condition_mean) and, in DDIM and DPM-Solver++, eps by -sqrt(1 - abar) * guide
(condition_score). Every sample draws its noise from its
own key, so a sample does not depend on the batch it was drawn in. Step i of a sampler goes from index i of the
process to index i - 1 (to the data at i = 0); the scan runs i = N-1, ..., 0. DDIM alone lands where the process's
`ddim_*` levels say (diffusers' DDIMScheduler rules and set_alpha_to_one=False may land elsewhere).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp

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


def _reverse_scan(diffusion: GaussianDiffusion, step, init):
  carry, _ = jax.lax.scan(lambda c, i: (step(c, i), None), init,
                          jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32))
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
                     guide: Guide | None = None) -> jax.Array:
  """DDPM ancestral sampling from x_T ~ N(0, I) down to x_0, one sample per key.

  Args:
    diffusion: the (possibly respaced) process.
    denoise: network output for a batch x_t at network timesteps t.
    keys: [B] PRNG keys, one per sample.
    sample_shape: shape of one sample, e.g. (H, W, C).
    clip_denoised: clip the predicted x_0 to [-1, 1] before forming the posterior mean.
    guide: classifier guidance (see the module docstring), or None.
  """
  init_keys, step_keys = split_keys(keys)

  def step(x, i):
    t = _batch_t(x, i)
    out = diffusion.p_mean_variance(denoise(x, diffusion.timestep_map[t]), x, t, clip_denoised=clip_denoised)
    mean = out.mean if guide is None else out.mean + out.variance * guide(x, diffusion.timestep_map[t])
    # No noise is added at the last step (t == 0).
    std = jnp.where(i > 0, jnp.exp(0.5 * out.log_variance), 0.0)
    return mean + std * step_noise(step_keys, i, sample_shape)

  return _reverse_scan(diffusion, step, per_sample_normal(init_keys, sample_shape))


def ddim_sample(diffusion: GaussianDiffusion, denoise: Denoise, keys: jax.Array, sample_shape: tuple[int, ...],
                *, eta: float = 0.0, clip_denoised: bool = True, x_T: jax.Array | None = None,
                guide: Guide | None = None) -> jax.Array:
  """DDIM (Song et al., 2021, eq. 12): eta = 0 is the deterministic ODE path, eta = 1 matches DDPM's variance.

  Arguments as `ancestral_sample`; eps is re-derived from the clipped x_0 prediction (diffusers'
  use_clipped_model_output=True). `x_T` replaces the initial draw, e.g. with the output of `ddim_invert`. Step i
  lands on `diffusion.ddim_alpha_prev[i]` (the next index, or the data, unless diffusers' rules say otherwise).
  """
  init_keys, step_keys = split_keys(keys)

  def step(x, i):
    t = _batch_t(x, i)
    x0, eps = diffusion.pred_x0_eps(denoise(x, diffusion.timestep_map[t]), x, t, clip_denoised=clip_denoised)
    x0, eps = _condition_score(diffusion, guide, x, t, x0, eps)
    alpha_prev, sigma_prev = diffusion.ddim_alpha_prev[i], diffusion.ddim_sigma_prev[i]
    # DDIM's sigma_t(eta)^2 is eta^2 times the posterior variance of the step (0 into the data).
    noise_var = eta ** 2 * diffusion.ddim_variance[i]
    x = alpha_prev * x0 + jnp.sqrt(jnp.maximum(sigma_prev ** 2 - noise_var, 0.0)) * eps
    return x + jnp.sqrt(noise_var) * step_noise(step_keys, i, sample_shape) if eta else x

  return _reverse_scan(diffusion, step, per_sample_normal(init_keys, sample_shape) if x_T is None else x_T)


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
                         guide: Guide | None = None) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al., 2022): multistep second order in the data prediction, midpoint form.

  The previous x_0 prediction and log-SNR are carried in the scan. The first step and the last (to noise level 0,
  which returns the x_0 prediction) are first order: diffusers' final_sigmas_type='zero', whatever the process's
  set_alpha_to_one. Arguments as `ancestral_sample`; clip_denoised clips the data prediction.
  """
  init_keys, _ = split_keys(keys)

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
    first_order = (i == diffusion.num_timesteps - 1) | (i == 0)
    d = jnp.where(first_order, x0, x0 + (x0 - prev_x0) / (2 * r))
    x = sigma_t / sigma_s * x - alpha_t * jnp.expm1(-h) * d
    return x, x0, lam_s

  x_T = per_sample_normal(init_keys, sample_shape)
  x, _, _ = _reverse_scan(diffusion, step, (x_T, jnp.zeros_like(x_T), jnp.zeros((), jnp.float32)))
  return x


def get_sampler(name: str, *, eta: float = 0.0):
  """The sampler `sample.sampler` names, as f(diffusion, denoise, keys, sample_shape, *, clip_denoised, guide)."""
  if name == "ancestral":
    return ancestral_sample
  if name == "ddim":
    if eta < 0:
      raise ConfigError(f"sample.eta must be >= 0, got {eta}.")
    return functools.partial(ddim_sample, eta=eta)
  if name == "dpm_solver++":
    return dpm_solver_pp_sample
  raise ConfigError(f"Unknown sample.sampler {name!r}: use one of {', '.join(SAMPLERS)}.")
