"""The Gaussian diffusion process as a pytree, separate from the network.

Every coefficient is computed in float64 with NumPy and stored as float32 arrays; `timestep_map` maps an index of
this (possibly respaced) process to the timestep the network was trained with. The `ddim_*` arrays say where DDIM's
step i lands: index i - 1 (the data at i = 0) unless diffusers' rules say otherwise (see `create_diffusion`).
"""

import enum
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import schedules
from jaxdiff.errors import ConfigError


class MeanType(enum.Enum):
  """What the network predicts."""
  EPSILON = "epsilon"
  START_X = "x0"
  VELOCITY = "v"


class VarType(enum.Enum):
  """How the reverse-process variance is chosen."""
  FIXED_SMALL = "fixed_small"  # the true posterior variance beta_tilde
  FIXED_LARGE = "fixed_large"  # beta (with beta_tilde at t=0, as in the DDPM code)
  LEARNED_RANGE = "learned_range"  # interpolation in log space between beta_tilde and beta


def _parse_enum(enum_cls, value: str, key: str):
  try:
    return enum_cls(value)
  except ValueError:
    choices = ", ".join(m.value for m in enum_cls)
    raise ConfigError(f"Unknown {key} {value!r}: use one of {choices}.") from None


class LossType(enum.Enum):
  """The training objective (improved DDPM's names in brackets)."""
  MSE = "mse"  # L_simple [MSE]
  HYBRID = "hybrid"  # L_simple + vlb_weight * L_vlb, the mean frozen in L_vlb [RESCALED_MSE at vlb_weight 1e-3]
  KL = "kl"  # L_vlb alone [RESCALED_KL]


def parse_loss(name: str, var_type: VarType) -> LossType:
  """The `diffusion.loss` of a config, refusing a learned variance that nothing would train."""
  loss_type = _parse_enum(LossType, name, "diffusion.loss")
  if loss_type == LossType.MSE and var_type == VarType.LEARNED_RANGE:
    raise ConfigError("diffusion.var_type='learned_range' is trained by the VLB: set diffusion.loss to 'hybrid' or "
                      "'kl', or use a fixed variance.")
  return loss_type


class PMeanVar(NamedTuple):
  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array
  pred_x0: jax.Array


class Losses(NamedTuple):
  """Per-example terms: `loss` is what is minimised; `vb` is L_t in bits per dimension."""
  loss: jax.Array
  mse: jax.Array
  vb: jax.Array


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF that the DDPM code uses (kept for comparable bits/dim)."""
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) in nats of 8-bit data scaled to [-1, 1] under a Gaussian integrated over each of the 256 bins."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  # The edge bins take the tails, so the 256 probabilities sum to one.
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _f32(a: np.ndarray) -> jax.Array:
  return jnp.asarray(a.astype(np.float32))


def _extract(coef: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """coef[t] shaped [B, 1, ..., 1] to broadcast against a batch of rank ndim."""
  return coef[t].reshape(t.shape + (1,) * (ndim - t.ndim))


@flax.struct.dataclass
class GaussianDiffusion:
  """q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0) and the model's p(x_{t-1} | x_t)."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  timestep_map: jax.Array
  ddim_alpha_prev: jax.Array  # sqrt(alpha_bar) of the level DDIM's step i goes to
  ddim_sigma_prev: jax.Array  # sqrt(1 - alpha_bar) of it
  ddim_variance: jax.Array  # DDIM's sigma_i^2 at eta = 1 for that step
  mean_type: MeanType = flax.struct.field(pytree_node=False, default=MeanType.EPSILON)
  var_type: VarType = flax.struct.field(pytree_node=False, default=VarType.FIXED_LARGE)

  @classmethod
  def from_betas(cls, betas: np.ndarray, *, mean_type: MeanType = MeanType.EPSILON,
                 var_type: VarType = VarType.FIXED_LARGE, timestep_map=None,
                 ddim_prev_alphas_cumprod=None) -> "GaussianDiffusion":
    """The process of these betas; `ddim_prev_alphas_cumprod` [N] is the alpha_bar each DDIM step lands on (by
    default alphas_cumprod_prev: the index before, 1 at index 0)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not (np.all(betas > 0) and np.all(betas <= 1)):
      raise ConfigError("Betas must be a 1-D array in (0, 1]: check diffusion.schedule and beta_start/beta_end.")
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta_tilde_0 is 0; its log is clipped to beta_tilde_1 so the log stays finite.
    posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    if timestep_map is None:
      timestep_map = np.arange(len(betas))
    ddim_prev = alphas_cumprod_prev if ddim_prev_alphas_cumprod is None else np.asarray(ddim_prev_alphas_cumprod,
                                                                                           np.float64)
    ddim_variance = (1.0 - ddim_prev) / (1.0 - alphas_cumprod) * (1.0 - alphas_cumprod / ddim_prev)
    return cls(
        betas=_f32(betas),
        alphas_cumprod=_f32(alphas_cumprod),
        alphas_cumprod_prev=_f32(alphas_cumprod_prev),
        sqrt_alphas_cumprod=_f32(np.sqrt(alphas_cumprod)),
        sqrt_one_minus_alphas_cumprod=_f32(np.sqrt(1.0 - alphas_cumprod)),
        sqrt_recip_alphas_cumprod=_f32(np.sqrt(1.0 / alphas_cumprod)),
        sqrt_recipm1_alphas_cumprod=_f32(np.sqrt(1.0 / alphas_cumprod - 1)),
        posterior_variance=_f32(posterior_variance),
        posterior_log_variance_clipped=_f32(posterior_log_variance_clipped),
        posterior_mean_coef1=_f32(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)),
        posterior_mean_coef2=_f32((1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)),
        timestep_map=jnp.asarray(np.asarray(timestep_map, dtype=np.int32)),
        ddim_alpha_prev=_f32(np.sqrt(ddim_prev)),
        ddim_sigma_prev=_f32(np.sqrt(1.0 - ddim_prev)),
        ddim_variance=_f32(ddim_variance),
        mean_type=mean_type,
        var_type=var_type,
    )

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def output_channels_factor(self) -> int:
    """How many outputs per image channel the network needs (2 when it also predicts the variance)."""
    return 2 if self.var_type == VarType.LEARNED_RANGE else 1

  # Forward process.
  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t ~ q(x_t | x_0), reparameterised with the given noise."""
    return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

  def q_posterior(self, x0: jax.Array, x_t: jax.Array, t: jax.Array):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = (_extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
            + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
    return (mean, _extract(self.posterior_variance, t, x_t.ndim),
            _extract(self.posterior_log_variance_clipped, t, x_t.ndim))

  # Parameterisations.
  def predict_x0_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

  def predict_eps_from_x0(self, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
            / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

  def predict_x0_from_v(self, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    return (_extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)

  def velocity(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """v = sqrt(abar) * eps - sqrt(1 - abar) * x0 (Salimans & Ho, 2022)."""
    return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

  def split_output(self, model_output: jax.Array):
    """(mean part, variance part or None) of the network output, split on the channel axis."""
    if self.var_type == VarType.LEARNED_RANGE:
      return jnp.split(model_output, 2, axis=-1)
    return model_output, None

  def pred_x0(self, mean_output: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    if self.mean_type == MeanType.EPSILON:
      return self.predict_x0_from_eps(x_t, t, mean_output)
    if self.mean_type == MeanType.VELOCITY:
      return self.predict_x0_from_v(x_t, t, mean_output)
    return mean_output

  def p_mean_variance(self, model_output: jax.Array, x_t: jax.Array, t: jax.Array, *,
                      clip_denoised: bool = True) -> PMeanVar:
    """p(x_{t-1} | x_t) from the network output at index t of this process."""
    _, var_output = self.split_output(model_output.astype(jnp.float32))
    ndim = x_t.ndim
    if self.var_type == VarType.LEARNED_RANGE:
      min_log = _extract(self.posterior_log_variance_clipped, t, ndim)
      max_log = _extract(jnp.log(self.betas), t, ndim)
      frac = (var_output + 1) / 2
      log_variance = frac * max_log + (1 - frac) * min_log
      variance = jnp.exp(log_variance)
    elif self.var_type == VarType.FIXED_LARGE:
      large = jnp.concatenate([self.posterior_variance[1:2], self.betas[1:]])
      variance = jnp.broadcast_to(_extract(large, t, ndim), x_t.shape)
      log_variance = jnp.log(variance)
    else:
      variance = jnp.broadcast_to(_extract(self.posterior_variance, t, ndim), x_t.shape)
      log_variance = jnp.broadcast_to(_extract(self.posterior_log_variance_clipped, t, ndim), x_t.shape)
    pred_x0, _ = self.pred_x0_eps(model_output, x_t, t, clip_denoised=clip_denoised)
    mean, _, _ = self.q_posterior(pred_x0, x_t, t)
    return PMeanVar(mean, variance, log_variance, pred_x0)

  def pred_x0_eps(self, model_output: jax.Array, x_t: jax.Array, t: jax.Array, *,
                  clip_denoised: bool = True) -> tuple[jax.Array, jax.Array]:
    """(x_0, eps) from the network output; eps is re-derived from the (clipped) x_0, as improved DDPM's DDIM does."""
    mean_output, _ = self.split_output(model_output.astype(jnp.float32))
    pred_x0 = self.pred_x0(mean_output, x_t, t)
    if clip_denoised:
      pred_x0 = jnp.clip(pred_x0, -1, 1)
    return pred_x0, self.predict_eps_from_x0(x_t, t, pred_x0)

  # Training.
  def mean_target(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """What the mean part of the network output is regressed onto."""
    if self.mean_type == MeanType.EPSILON:
      return noise
    if self.mean_type == MeanType.VELOCITY:
      return self.velocity(x0, t, noise)
    return x0

  def simple_loss(self, model_output: jax.Array, x0: jax.Array, t: jax.Array,
                  noise: jax.Array) -> jax.Array:
    """DDPM's L_simple per example: mean squared error of the mean prediction."""
    mean_output, _ = self.split_output(model_output.astype(jnp.float32))
    return _mean_flat((mean_output - self.mean_target(x0, t, noise)) ** 2)

  def vb_terms_bpd(self, model_output: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array, *,
                   clip_denoised: bool = False) -> jax.Array:
    """L_t per example in bits per dimension: the decoder NLL at t=0, KL(q(x_{t-1}|x_t,x_0) || p) otherwise."""
    true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
    out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / np.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, out.mean, 0.5 * out.log_variance)) / np.log(2.0)
    return jnp.where(t == 0, nll, kl)

  def prior_bpd(self, x0: jax.Array) -> jax.Array:
    """KL(q(x_T | x_0) || N(0, I)) per example in bits per dimension (no parameters: a constant of the data)."""
    t = jnp.full(x0.shape[:1], self.num_timesteps - 1)
    mean = _extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
    log_variance = jnp.log(_extract(1.0 - self.alphas_cumprod, t, x0.ndim))
    return _mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / np.log(2.0)

  def min_snr_weight(self, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma weights (Hang et al., 2023) of the mean loss at t: the x_0 error weighted by min(SNR, gamma),
    written for what the network predicts (eps: min(SNR, gamma) / SNR, v: min(SNR, gamma) / (SNR + 1))."""
    snr = (self.sqrt_alphas_cumprod[t] / self.sqrt_one_minus_alphas_cumprod[t]) ** 2  # both from float64
    clipped = jnp.minimum(snr, gamma)
    if self.mean_type == MeanType.EPSILON:
      return clipped / snr
    if self.mean_type == MeanType.VELOCITY:
      return clipped / (snr + 1.0)
    return clipped

  def training_losses(self, model_output: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array,
                      noise: jax.Array, *, loss_type: LossType, vlb_weight: float = 1e-3,
                      min_snr_gamma: float = 0.0) -> Losses:
    """The per-example objective at timesteps t of this process.

    The VLB is estimated as T * L_t (an unbiased estimate of sum_t L_t for uniform t), in bits per dimension. In the
    hybrid loss the mean output is frozen in the VLB term, so L_vlb trains only the variance (improved DDPM, sec 3.1).
    min_snr_gamma > 0 weights the mean loss by `min_snr_weight`; `Losses.mse` stays the unweighted error.
    """
    model_output = model_output.astype(jnp.float32)
    mse = self.simple_loss(model_output, x0, t, noise)
    weighted = mse * self.min_snr_weight(t, min_snr_gamma) if min_snr_gamma > 0 else mse
    if loss_type == LossType.KL:
      vb = self.vb_terms_bpd(model_output, x0, x_t, t)
      return Losses(loss=self.num_timesteps * vb, mse=mse, vb=vb)
    if loss_type == LossType.MSE:
      return Losses(loss=weighted, mse=mse, vb=jnp.zeros_like(mse))
    mean_output, var_output = self.split_output(model_output)
    frozen = jax.lax.stop_gradient(mean_output)
    vb = self.vb_terms_bpd(frozen if var_output is None else jnp.concatenate([frozen, var_output], -1), x0, x_t, t)
    return Losses(loss=weighted + vlb_weight * self.num_timesteps * vb, mse=mse, vb=vb)

  def bits_per_dim(self, denoise, x0: jax.Array, key: jax.Array, *, clip_denoised: bool = True) -> dict:
    """The full VLB of a batch in bits per dimension: every L_t at one draw of x_t each, plus the prior term.

    One `lax.scan` over the T timesteps of this process; `denoise(x_t, t)` takes network timesteps, as the samplers'.
    The noise of x_t at index t is `jax.random.normal(jax.random.split(key, T)[t], x0.shape)` (the improved-diffusion
    fixtures rely on it). Returns per-example `total`, `prior` and `terms` [B, T].
    """
    def term(_, t_and_key):
      i, k = t_and_key
      t = jnp.full(x0.shape[:1], i, dtype=jnp.int32)
      x_t = self.q_sample(x0, t, jax.random.normal(k, x0.shape, jnp.float32))
      vb = self.vb_terms_bpd(denoise(x_t, self.timestep_map[t]), x0, x_t, t, clip_denoised=clip_denoised)
      return None, vb

    steps = jnp.arange(self.num_timesteps, dtype=jnp.int32)
    _, terms = jax.lax.scan(term, None, (steps, jax.random.split(key, self.num_timesteps)))
    terms = terms.T
    prior = self.prior_bpd(x0)
    return {"total": terms.sum(axis=1) + prior, "prior": prior, "terms": terms}


def create_diffusion(diffusion_cfg, timestep_respacing: str = "", *, sampler: str = "ddim", steps_offset: int = 0,
                     set_alpha_to_one: bool = True) -> GaussianDiffusion:
  """The process of a config's `diffusion` section, respaced for sampling (see `schedules.space_timesteps`).

  `sampler`, `steps_offset` and `set_alpha_to_one` are the `sample` keys. The diffusers spacings ("leadingN", ...)
  keep the timesteps that `sampler`'s diffusers scheduler visits, and DDIM then lands where DDIMScheduler does
  (`schedules.ddim_target_timesteps`). set_alpha_to_one=False (diffusers' DDIM, SD's configs) ends DDIM at
  alphas_cumprod[0] of the training process instead of alpha_bar 1 (the data); the other samplers end at the data
  whatever it says, as DDPMScheduler and DPMSolverMultistepScheduler (final_sigmas_type='zero') do.
  """
  betas = schedules.get_betas(diffusion_cfg.schedule, diffusion_cfg.num_timesteps,
                              beta_start=diffusion_cfg.beta_start, beta_end=diffusion_cfg.beta_end)
  timesteps = schedules.space_timesteps(len(betas), timestep_respacing, sampler=sampler, steps_offset=steps_offset)
  alphas_cumprod = np.cumprod(1.0 - betas)
  targets = schedules.ddim_target_timesteps(len(betas), timestep_respacing, timesteps)
  final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
  return GaussianDiffusion.from_betas(
      schedules.respace_betas(betas, timesteps),
      mean_type=_parse_enum(MeanType, diffusion_cfg.mean_type, "diffusion.mean_type"),
      var_type=_parse_enum(VarType, diffusion_cfg.var_type, "diffusion.var_type"),
      timestep_map=timesteps,
      ddim_prev_alphas_cumprod=np.where(targets >= 0, alphas_cumprod[np.maximum(targets, 0)], final))
