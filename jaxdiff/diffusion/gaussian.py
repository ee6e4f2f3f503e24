"""The Gaussian diffusion process as a pytree, separate from the network.

Every coefficient is computed in float64 with NumPy and stored as float32 arrays; `timestep_map` maps an index of
this (possibly respaced) process to the timestep the network was trained with.
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


class PMeanVar(NamedTuple):
  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array
  pred_x0: jax.Array


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
  mean_type: MeanType = flax.struct.field(pytree_node=False, default=MeanType.EPSILON)
  var_type: VarType = flax.struct.field(pytree_node=False, default=VarType.FIXED_LARGE)

  @classmethod
  def from_betas(cls, betas: np.ndarray, *, mean_type: MeanType = MeanType.EPSILON,
                 var_type: VarType = VarType.FIXED_LARGE, timestep_map=None) -> "GaussianDiffusion":
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
    mean_output, var_output = self.split_output(model_output.astype(jnp.float32))
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
    pred_x0 = self.pred_x0(mean_output, x_t, t)
    if clip_denoised:
      pred_x0 = jnp.clip(pred_x0, -1, 1)
    mean, _, _ = self.q_posterior(pred_x0, x_t, t)
    return PMeanVar(mean, variance, log_variance, pred_x0)

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
    err = (mean_output - self.mean_target(x0, t, noise)) ** 2
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def create_diffusion(diffusion_cfg) -> GaussianDiffusion:
  """The training process described by a config's `diffusion` section."""
  betas = schedules.get_betas(diffusion_cfg.schedule, diffusion_cfg.num_timesteps,
                              beta_start=diffusion_cfg.beta_start, beta_end=diffusion_cfg.beta_end)
  return GaussianDiffusion.from_betas(
      betas,
      mean_type=_parse_enum(MeanType, diffusion_cfg.mean_type, "diffusion.mean_type"),
      var_type=_parse_enum(VarType, diffusion_cfg.var_type, "diffusion.var_type"))
