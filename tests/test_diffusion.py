"""The diffusion core against closed forms and float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxdiff.diffusion import (GaussianDiffusion, LossType, MeanType, VarType, ancestral_sample, get_betas,
                               schedules)
from jaxdiff.errors import ConfigError


def _numpy_process(betas):
  alphas = 1 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  return alphas, abar, abar_prev


class TestSchedules:

  def test_linear_closed_form(self):
    betas = get_betas("linear", 1000, beta_start=1e-4, beta_end=0.02)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(betas[[0, 499, 999]], [1e-4, 1e-4 + 499 * (0.02 - 1e-4) / 999, 0.02], rtol=1e-12)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)

  def test_cosine_matches_alpha_bar(self):
    T = 4000
    betas = get_betas("cosine", T)
    abar = np.cumprod(1 - betas)
    t = np.arange(1, T + 1) / T
    expected = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    unclipped = betas < 0.999
    assert unclipped[:-1].all() and betas[-1] == 0.999  # only the singular last step is clipped
    np.testing.assert_allclose(abar[unclipped], expected[unclipped], rtol=1e-10)

  @pytest.mark.parametrize("name,kwargs", [("cosinee", {}), ("linear", {"beta_start": 0.1, "beta_end": 0.01})])
  def test_bad_schedule(self, name, kwargs):
    with pytest.raises(ConfigError, match="diffusion"):
      get_betas(name, 100, **kwargs)


class TestGaussian(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.betas = schedules.get_betas("linear", 1000)
    self.rng = np.random.default_rng(0)
    self.x0 = self.rng.uniform(-1, 1, (5, 4, 4, 3))
    self.noise = self.rng.normal(size=self.x0.shape)
    self.t = np.array([0, 1, 10, 500, 999])

  def test_q_sample_against_float64(self):
    diffusion = GaussianDiffusion.from_betas(self.betas)
    _, abar, _ = _numpy_process(self.betas)
    c = abar[self.t][:, None, None, None]
    expected = np.sqrt(c) * self.x0 + np.sqrt(1 - c) * self.noise
    got = jax.jit(diffusion.q_sample)(jnp.float32(self.x0), jnp.asarray(self.t), jnp.float32(self.noise))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

  def test_posterior_against_gaussian_conditioning(self):
    # Independent derivation: condition the joint Gaussian of (x_{t-1}, x_t) given x_0 on x_t.
    diffusion = GaussianDiffusion.from_betas(self.betas)
    alphas, abar, abar_prev = _numpy_process(self.betas)
    t = self.t[1:]  # t = 0 has no x_{t-1}
    x0, x_t = self.x0[1:], self.rng.normal(size=self.x0[1:].shape)
    e = lambda a: a[t][:, None, None, None]
    mu1, var1 = np.sqrt(e(abar_prev)) * x0, 1 - e(abar_prev)
    mu2, var2 = np.sqrt(e(abar)) * x0, 1 - e(abar)
    cov12 = np.sqrt(e(alphas)) * var1
    mean = mu1 + cov12 / var2 * (x_t - mu2)
    var = var1 - cov12 ** 2 / var2
    got_mean, got_var, got_logvar = jax.jit(diffusion.q_posterior)(
        jnp.float32(x0), jnp.float32(x_t), jnp.asarray(t))
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_var[:, 0, 0, 0], var[:, 0, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(got_logvar[:, 0, 0, 0], np.log(var[:, 0, 0, 0]), rtol=1e-5)

  def test_posterior_log_variance_clipped_at_zero(self):
    diffusion = GaussianDiffusion.from_betas(self.betas)
    assert diffusion.posterior_variance[0] == 0
    np.testing.assert_allclose(diffusion.posterior_log_variance_clipped[0], np.log(diffusion.posterior_variance[1]))

  @parameterized.parameters(MeanType.EPSILON, MeanType.START_X, MeanType.VELOCITY)
  def test_exact_prediction_recovers_x0(self, mean_type):
    diffusion = GaussianDiffusion.from_betas(self.betas, mean_type=mean_type)
    x0, noise, t = jnp.float32(self.x0), jnp.float32(self.noise), jnp.asarray(self.t)
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.mean_target(x0, t, noise)
    out = jax.jit(lambda o: diffusion.p_mean_variance(o, x_t, t, clip_denoised=False))(target)
    np.testing.assert_allclose(out.pred_x0, x0, atol=2e-3 if mean_type == MeanType.EPSILON else 1e-4)
    np.testing.assert_allclose(diffusion.simple_loss(target, x0, t, noise), 0.0, atol=1e-12)

  @parameterized.parameters(VarType.FIXED_SMALL, VarType.FIXED_LARGE)
  def test_fixed_variances(self, var_type):
    diffusion = GaussianDiffusion.from_betas(self.betas, var_type=var_type)
    _, abar, abar_prev = _numpy_process(self.betas)
    beta_tilde = self.betas * (1 - abar_prev) / (1 - abar)
    expected = beta_tilde if var_type == VarType.FIXED_SMALL else np.append(beta_tilde[1], self.betas[1:])
    t = jnp.asarray(self.t)
    out = diffusion.p_mean_variance(jnp.zeros(self.x0.shape), jnp.zeros(self.x0.shape), t)
    np.testing.assert_allclose(out.variance[:, 0, 0, 0], expected[self.t], rtol=1e-5)
    if var_type == VarType.FIXED_LARGE:
      np.testing.assert_allclose(out.log_variance[:, 0, 0, 0], np.log(expected[self.t]), rtol=1e-5)

  def test_learned_range_interpolates_log_variance(self):
    diffusion = GaussianDiffusion.from_betas(self.betas, var_type=VarType.LEARNED_RANGE)
    t = jnp.asarray(self.t[1:])
    shape = (4, 2, 2, 3)
    for v, expected in [(-1.0, diffusion.posterior_log_variance_clipped), (1.0, jnp.log(diffusion.betas))]:
      out = diffusion.p_mean_variance(jnp.concatenate([jnp.zeros(shape), jnp.full(shape, v)], -1),
                                      jnp.zeros(shape), t)
      np.testing.assert_allclose(out.log_variance[:, 0, 0, 0], expected[t], rtol=1e-5)


def _point_mass_denoiser(diffusion, target):
  """The exact eps-prediction when all data equal `target`."""
  def denoise(x, t):
    abar = diffusion.alphas_cumprod[t][:, None, None, None]
    return (x - jnp.sqrt(abar) * target) / jnp.sqrt(1 - abar)
  return denoise


class TestAncestralSampler:

  def test_point_mass_data_is_recovered(self):
    diffusion = GaussianDiffusion.from_betas(get_betas("linear", 100, beta_start=1e-3, beta_end=0.2))
    target = jnp.linspace(-0.8, 0.8, 12).reshape(2, 2, 3)
    keys = jax.random.split(jax.random.key(0), 3)
    sample = jax.jit(lambda k: ancestral_sample(diffusion, _point_mass_denoiser(diffusion, target), k, (2, 2, 3)))
    x = sample(keys)
    np.testing.assert_allclose(x, jnp.broadcast_to(target, x.shape), atol=1e-4)

  def test_sample_does_not_depend_on_its_batch(self):
    diffusion = GaussianDiffusion.from_betas(get_betas("linear", 20, beta_start=1e-3, beta_end=0.2))
    denoise = lambda x, t: 0.5 * x  # any deterministic network
    keys = jax.random.split(jax.random.key(1), 4)
    sample = jax.jit(lambda k: ancestral_sample(diffusion, denoise, k, (3, 3, 1)))
    full = sample(keys)
    np.testing.assert_allclose(sample(keys[2:]), full[2:], atol=1e-6)
    assert not np.allclose(full[0], full[1])

  def test_program_size_does_not_grow_with_steps(self):
    denoise = lambda x, t: 0.5 * x
    def hlo_size(steps):
      diffusion = GaussianDiffusion.from_betas(get_betas("linear", steps))
      # The process is an argument, so its arrays (which do grow with T) are not printed as constants.
      fn = jax.jit(lambda d, k: ancestral_sample(d, denoise, k, (4, 4, 1)))
      return len(fn.lower(diffusion, jax.random.split(jax.random.key(0), 2)).as_text())
    small, large = hlo_size(10), hlo_size(1000)
    assert large < small * 1.05, (small, large)


@pytest.mark.parametrize("mean_type", list(MeanType))
def test_min_snr_weights_the_x0_error_by_min_snr_gamma(mean_type):
  """Whatever the network predicts, the weighted loss equals min(SNR, gamma) times the squared x_0 error."""
  betas = get_betas("linear", 1000)
  diffusion = GaussianDiffusion.from_betas(betas, mean_type=mean_type)
  _, abar, _ = _numpy_process(betas)
  t = jnp.array([0, 10, 100, 500, 999])
  x0 = jax.random.normal(jax.random.key(0), (5, 4, 4, 1))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  x_t = diffusion.q_sample(x0, t, noise)
  target = diffusion.mean_target(x0, t, noise)
  output = target + 0.1 * jax.random.normal(jax.random.key(2), x0.shape)  # an imperfect prediction
  losses = diffusion.training_losses(output, x0, x_t, t, noise, loss_type=LossType.MSE, min_snr_gamma=5.0)
  pred_x0 = diffusion.pred_x0(output, x_t, t)
  x0_error = np.mean(np.square(np.asarray(pred_x0 - x0, np.float64)), axis=(1, 2, 3))
  snr = abar[np.asarray(t)] / (1 - abar[np.asarray(t)])
  np.testing.assert_allclose(losses.loss, np.minimum(snr, 5.0) * x0_error, rtol=2e-3)
  unweighted = diffusion.training_losses(output, x0, x_t, t, noise, loss_type=LossType.MSE)
  np.testing.assert_allclose(losses.mse, unweighted.loss, rtol=1e-6)  # the logged mse stays unweighted
