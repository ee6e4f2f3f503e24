"""Improved DDPM pieces: respacing, the VLB terms and hybrid loss, importance sampling of t, DDIM inversion,
the samplers' program size, and bits/dim falling as the iddpm_cifar10 smoke config trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdiff.diffusion import (GaussianDiffusion, LossHistory, LossType, MeanType, VarType, ddim_invert,
                               ddim_sample, get_sampler, parse_loss, schedules)
from jaxdiff.errors import ConfigError


@pytest.mark.parametrize("respacing,expected", [
    ("ddim5", [0, 20, 40, 60, 80]),
    ("5", [0, 25, 50, 74, 99]),
    ("2,3", [0, 49, 50, 74, 99]),
    ("", list(range(100))),
])
def test_space_timesteps(respacing, expected):
  np.testing.assert_array_equal(schedules.space_timesteps(100, respacing), expected)


@pytest.mark.parametrize("respacing", ["ddim99", "0", "abc", "60,60"])
def test_bad_respacing(respacing):
  with pytest.raises(ConfigError, match="timestep_respacing"):
    schedules.space_timesteps(100, respacing)


def test_respaced_process_keeps_alphas_cumprod():
  betas = schedules.get_betas("cosine", 4000)
  kept = schedules.space_timesteps(4000, "10,15,20")
  d = GaussianDiffusion.from_betas(schedules.respace_betas(betas, kept), timestep_map=kept,
                                   var_type=VarType.LEARNED_RANGE)
  np.testing.assert_allclose(d.alphas_cumprod, np.cumprod(1 - betas)[kept], rtol=1e-6)
  # The learned range spans the respaced process's beta_tilde..beta, not the training process's.
  abar = np.cumprod(1 - betas)[kept]
  beta = 1 - abar[1:] / abar[:-1]
  np.testing.assert_allclose(np.exp(d.posterior_log_variance_clipped[1:]), beta * (1 - abar[:-1]) / (1 - abar[1:]),
                             rtol=1e-5)


def _process(var_type=VarType.LEARNED_RANGE, mean_type=MeanType.EPSILON, T=50):
  return GaussianDiffusion.from_betas(schedules.get_betas("cosine", T), var_type=var_type, mean_type=mean_type)


def _batch(seed=0, shape=(6, 4, 4, 2)):
  rng = np.random.default_rng(seed)
  x0 = np.round(rng.uniform(-1, 1, shape) * 127.5) / 127.5  # on the 8-bit grid
  return jnp.float32(x0), jnp.float32(rng.normal(size=shape)), jnp.float32(rng.uniform(-1, 1, shape[:-1] + (4,)))


def test_vb_terms_against_float64_closed_forms():
  d = _process()
  x0, noise, out = _batch()
  t = jnp.array([0, 1, 10, 25, 48, 49])
  x_t = d.q_sample(x0, t, noise)
  vb = jax.jit(d.vb_terms_bpd)(out, x0, x_t, t)
  # Reference in float64 NumPy with the exact normal CDF (jaxdiff uses DDPM's tanh approximation).
  betas = schedules.get_betas("cosine", 50)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  x0, x_t, eps, v = (np.float64(a) for a in (x0, x_t, out[..., :2], out[..., 2:]))
  e = lambda a: a[np.asarray(t)][:, None, None, None]
  post_var = betas * (1 - abar_prev) / (1 - abar)
  log_min = e(np.log(np.append(post_var[1], post_var[1:])))
  log_var = (v + 1) / 2 * e(np.log(betas)) + (1 - v) / 2 * log_min
  c1, c2 = e(betas * np.sqrt(abar_prev) / (1 - abar)), e((1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar))
  pred_x0 = (x_t - e(np.sqrt(1 - abar)) * eps) / e(np.sqrt(abar))
  mean, true_mean = c1 * pred_x0 + c2 * x_t, c1 * x0 + c2 * x_t
  kl = 0.5 * (-1 + log_var - log_min + np.exp(log_min - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var))
  std = np.exp(0.5 * log_var)
  upper = np.where(x0 > 0.999, 1.0, stats.norm.cdf((x0 - mean + 1 / 255) / std))
  lower = np.where(x0 < -0.999, 0.0, stats.norm.cdf((x0 - mean - 1 / 255) / std))
  nll = -np.log(np.maximum(upper - lower, 1e-12))
  np.testing.assert_allclose(vb[1:], kl.mean((1, 2, 3))[1:] / np.log(2), rtol=1e-5)
  # The tanh CDF is within 0.5% of the exact one here.
  np.testing.assert_allclose(vb[0], nll.mean((1, 2, 3))[0] / np.log(2), rtol=5e-3)


def test_hybrid_loss_trains_the_mean_by_mse_and_the_variance_by_the_vlb():
  d = _process()
  x0, noise, out = _batch(1)
  t = jnp.array([0, 3, 10, 20, 30, 49])
  x_t = d.q_sample(x0, t, noise)
  hybrid = lambda o: jnp.sum(d.training_losses(o, x0, x_t, t, noise, loss_type=LossType.HYBRID).loss)
  mse = lambda o: jnp.sum(d.simple_loss(o, x0, t, noise))
  vb = lambda o: jnp.sum(d.vb_terms_bpd(o, x0, x_t, t))
  g, g_mse, g_vb = (jax.grad(f)(out) for f in (hybrid, mse, vb))
  np.testing.assert_allclose(g[..., :2], g_mse[..., :2], rtol=1e-6)
  np.testing.assert_allclose(g[..., 2:], 1e-3 * 50 * g_vb[..., 2:], rtol=1e-5, atol=1e-9)
  losses = d.training_losses(out, x0, x_t, t, noise, loss_type=LossType.KL)
  np.testing.assert_allclose(losses.loss, 50 * losses.vb, rtol=1e-6)
  with pytest.raises(ConfigError, match="hybrid"):
    parse_loss("mse", VarType.LEARNED_RANGE)


def test_prior_bpd_is_kl_to_standard_normal():
  d = _process(T=1000)
  x0, _, _ = _batch()
  abar = float(d.alphas_cumprod[-1])
  expected = 0.5 * (-1 - np.log(1 - abar) + (1 - abar) + abar * np.float64(x0) ** 2).mean((1, 2, 3)) / np.log(2)
  np.testing.assert_allclose(d.prior_bpd(x0), expected, rtol=1e-4, atol=1e-9)


def test_loss_history_warms_up_then_weights_by_second_moment():
  h = LossHistory.create(3, history=2)
  np.testing.assert_allclose(h.probabilities(), 1 / 3)
  h = h.update(jnp.array([0, 0, 0, 1, 1]), jnp.array([9.0, 1.0, 2.0, 3.0, 4.0]))
  np.testing.assert_array_equal(h.counts, [2, 2, 0])
  np.testing.assert_array_equal(h.losses[0], [1.0, 2.0])  # the oldest (9) was shifted out
  np.testing.assert_allclose(h.probabilities(), 1 / 3)  # t=2 has no history yet
  h = h.update(jnp.array([2, 2]), jnp.array([0.0, 0.0]))
  w = np.sqrt([2.5, 12.5, 0.0])
  np.testing.assert_allclose(h.probabilities(), w / w.sum() * (1 - 1e-3) + 1e-3 / 3, rtol=1e-6)
  t, weights = h.sample(jax.random.key(0), 4000)
  assert np.mean(np.asarray(t) == 2) < 0.01
  np.testing.assert_allclose(np.mean(weights), 1.0, atol=0.1)  # E[1 / (T p_t)] = 1


def test_ddim_inversion_round_trip():
  kept = schedules.space_timesteps(1000, "ddim50")
  d = GaussianDiffusion.from_betas(schedules.respace_betas(schedules.get_betas("linear", 1000), kept),
                                   timestep_map=kept)
  x0 = jnp.float32(np.random.default_rng(0).uniform(-0.9, 0.9, (2, 4, 4, 1)))
  # With eps independent of x each inverted step is the exact inverse of a DDIM step.
  denoise = lambda x, t: jnp.sin(t / 300.0)[:, None, None, None] + 0.0 * x
  x_T = jax.jit(lambda x: ddim_invert(d, denoise, x))(x0)
  back = jax.jit(lambda x: ddim_sample(d, denoise, jax.random.split(jax.random.key(0), 2), x.shape[1:],
                                       clip_denoised=False, x_init=x))(x_T)
  np.testing.assert_allclose(back, x0, atol=1e-4)


def test_ddim_inversion_error_is_first_order_in_the_step():
  """With eps depending on x, inversion takes eps at the start of each step, sampling at its end: a round trip is
  off by O(1 / steps) (0.3 at 100 steps here), as expected of DDIM inversion. Linear schedule: the cosine one ends at
  alpha_bar = 2e-9, where sampling's first x_0 = (x_T - sigma eps) / alpha amplifies that mismatch instead."""
  x0 = jnp.float32(np.random.default_rng(0).uniform(-0.9, 0.9, (2, 4, 4, 3)))
  denoise = lambda x, t: 0.3 * jnp.tanh(x) + 0.5 * jnp.sin(t / 300.0)[:, None, None, None]
  errors = []
  for steps in (20, 100, 500):
    kept = schedules.space_timesteps(1000, f"ddim{steps}")
    d = GaussianDiffusion.from_betas(schedules.respace_betas(schedules.get_betas("linear", 1000), kept),
                                     timestep_map=kept)
    back = jax.jit(lambda x: ddim_sample(d, denoise, jax.random.split(jax.random.key(0), 2), x.shape[1:],
                                         clip_denoised=False, x_init=ddim_invert(d, denoise, x)))(x0)
    errors.append(float(jnp.max(jnp.abs(back - x0))))
  assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5, errors  # 5x fewer steps: 4.0x, 4.9x


@pytest.mark.parametrize("name", ["ancestral", "ddim", "dpm_solver++"])
def test_program_size_does_not_grow_with_steps(name):
  sampler = get_sampler(name, eta=0.5)
  denoise = lambda x, t: 0.5 * x

  def hlo_size(steps):
    d = GaussianDiffusion.from_betas(schedules.get_betas("linear", steps), var_type=VarType.FIXED_SMALL)
    fn = jax.jit(lambda d, k: sampler(d, denoise, k, (4, 4, 1)))
    return len(fn.lower(d, jax.random.split(jax.random.key(0), 2)).as_text())

  small, large = hlo_size(10), hlo_size(1000)
  assert large < small * 1.05, (small, large)


@pytest.mark.slow
def test_iddpm_smoke_bits_per_dim_fall_as_it_trains(tfds_dir, tmp_path):
  from configs import iddpm_cifar10
  from jaxdiff import likelihood
  from jaxdiff.train import loop
  bpd = []
  for steps in (1, 60):
    config = iddpm_cifar10.get_config("smoke")
    config.data.data_dir = tfds_dir
    config.train.num_steps, config.train.checkpoint_every, config.train.num_grid_samples = steps, 1000, 1
    loop.run(config, str(tmp_path))
    bpd.append(likelihood.run(config, str(tmp_path))["bits_per_dim"])
  assert bpd[1] < bpd[0] - 0.5, bpd
