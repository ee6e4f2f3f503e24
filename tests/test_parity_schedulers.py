"""jaxdiff's samplers against diffusers' schedulers on the same network outputs and the same noise.

Conventions matched (jaxdiff's are improved DDPM's):
- Precision: jaxdiff computes its coefficients in float64 and runs in float32. diffusers computes them in the dtype
  of its tensors, and in float32 its `1 - alpha_bar_t / alpha_bar_prev` loses up to 1e-3 of a small beta to
  cancellation (5e-5 relative error in x_0 at T=100). So the reference runs in float64 from the float64
  alphas_cumprod: the test checks that jaxdiff's float32 sampler follows the exact algorithm.
- Timesteps: a respaced jaxdiff process keeps timesteps tau_0 < ... < tau_{N-1}, and the step from tau_0 goes to
  alpha_bar = 1. DDPMScheduler and DPMSolverMultistepScheduler take them as custom `timesteps` (descending; the last
  step's previous alpha_bar is `one` / sigma 0 with `final_sigmas_type='zero'`). DDIMScheduler has no custom
  timesteps; "ddimN" equals its `timestep_spacing='leading'` with `steps_offset=0` and `set_alpha_to_one=True`.
- DDIM re-derives eps from the clipped x_0 (`use_clipped_model_output=True`); DPM-Solver++ runs `solver_order=2`,
  `solver_type='midpoint'`, `lower_order_final=True` (first order into sigma 0), no thresholding.
- DDIM inversion runs DDIMInverseScheduler the same way (its test says how its timesteps correspond).
- Noise: x_T and every step's noise come from jaxdiff's keys and are handed to diffusers (`variance_noise` for DDIM;
  DDPMScheduler draws its own, so its `randn_tensor` is patched to return jaxdiff's draw).
The network is a fixed nonlinear function of (x, t) evaluated in JAX for both. Every x_t the network sees and the
final sample must agree within 1e-5 relative error (max |a - b| / max |b|).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import GaussianDiffusion, MeanType, VarType, schedules
from jaxdiff.diffusion import samplers

torch = pytest.importorskip("torch", reason="parity tests need the torch extra: pip install torch==2.13.0")
diffusers = pytest.importorskip("diffusers", reason="parity tests need the torch extra (diffusers)")
pytestmark = pytest.mark.torch

SHAPE = (4, 4, 3)
PREDICTION_TYPE = {MeanType.EPSILON: "epsilon", MeanType.START_X: "sample", MeanType.VELOCITY: "v_prediction"}
RTOL = 1e-5


def fake_network(x, t, *, num_timesteps, learned_variance):
  """A smooth nonlinear function of x and the network timestep, with outputs of a sensible size."""
  s = (t.astype(jnp.float32) / num_timesteps)[:, None, None, None]
  channel = jnp.arange(x.shape[-1], dtype=jnp.float32)
  mean = jnp.tanh(0.8 * x + jnp.sin(3.0 * s + channel)) + 0.3 * x * jnp.cos(2.0 * s)
  if not learned_variance:
    return mean
  return jnp.concatenate([mean, jnp.tanh(0.5 * x - jnp.cos(4.0 * s + channel))], axis=-1)


def make_process(schedule, num_timesteps, respacing, mean_type, var_type):
  betas = schedules.get_betas(schedule, num_timesteps)
  kept = schedules.space_timesteps(num_timesteps, respacing)
  diffusion = GaussianDiffusion.from_betas(schedules.respace_betas(betas, kept), mean_type=mean_type,
                                           var_type=var_type, timestep_map=kept)
  return diffusion, np.cumprod(1.0 - betas), kept


def spy_on(diffusion, denoise):
  """(denoise that also records each x it is given, {step index i: that x})."""
  seen = {}

  def record(i, x):
    seen[int(i)] = np.asarray(x)

  def spy(x, t):
    jax.debug.callback(record, jnp.searchsorted(diffusion.timestep_map, t[0]), x)
    return denoise(x, t)

  return spy, seen


def run_jaxdiff(sampler, diffusion, denoise, keys, **kwargs):
  """The final sample and every x the network saw, by step index i (N-1 first)."""
  spy, seen = spy_on(diffusion, denoise)
  final = np.asarray(jax.jit(lambda d, k: sampler(d, spy, k, SHAPE, **kwargs))(diffusion, keys))
  return [seen[i] for i in sorted(seen, reverse=True)] + [final]


def to_torch(x):
  return torch.from_numpy(np.moveaxis(np.asarray(x, np.float64), -1, 1).copy())


def to_numpy(x):
  return np.moveaxis(x.numpy(), 1, -1).astype(np.float32)


def run_diffusers(scheduler, denoise, x_T, step_kwargs):
  """Every x the network saw and the final sample; step_kwargs(k) gives extra `step` arguments of step k."""
  sample = to_torch(x_T)
  seen = []
  for k, t in enumerate(scheduler.timesteps):
    x = to_numpy(sample)
    seen.append(x)
    out = denoise(jnp.asarray(x), jnp.full((x.shape[0],), int(t), jnp.int32))
    sample = scheduler.step(to_torch(out), t, sample, **step_kwargs(k)).prev_sample
  return seen + [to_numpy(sample)]


def assert_trajectories_match(ours, theirs):
  assert len(ours) == len(theirs)
  errors = [np.max(np.abs(a - b)) / np.max(np.abs(b)) for a, b in zip(ours, theirs)]
  assert max(errors) < RTOL, errors
  return max(errors)


def noises(diffusion, keys):
  init_keys, step_keys = samplers.split_keys(keys)
  x_T = samplers.per_sample_normal(init_keys, SHAPE)
  return x_T, lambda i: np.asarray(samplers.step_noise(step_keys, jnp.int32(i), SHAPE))


CASES = [  # schedule, T, respacing, mean type
    ("linear", 1000, "ddim25", MeanType.EPSILON),
    ("linear", 100, "", MeanType.START_X),
    ("cosine", 1000, "10,15,20", MeanType.VELOCITY),
    ("cosine", 4000, "ddim50", MeanType.EPSILON),
]


@pytest.mark.parametrize("schedule,num_timesteps,respacing,mean_type", CASES)
@pytest.mark.parametrize("var_type,clip", [(VarType.FIXED_SMALL, True), (VarType.FIXED_LARGE, False),
                                           (VarType.LEARNED_RANGE, True)])
def test_ancestral_matches_ddpm_scheduler(monkeypatch, schedule, num_timesteps, respacing, mean_type, var_type, clip):
  diffusion, alphas_cumprod, kept = make_process(schedule, num_timesteps, respacing, mean_type, var_type)
  denoise = functools.partial(fake_network, num_timesteps=num_timesteps,
                              learned_variance=var_type == VarType.LEARNED_RANGE)
  keys = jax.random.split(jax.random.key(0), 2)
  ours = run_jaxdiff(samplers.ancestral_sample, diffusion, denoise, keys, clip_denoised=clip)

  scheduler = diffusers.DDPMScheduler(num_train_timesteps=num_timesteps, variance_type=var_type.value,
                                      prediction_type=PREDICTION_TYPE[mean_type], clip_sample=clip)
  scheduler.alphas_cumprod = torch.from_numpy(alphas_cumprod)
  scheduler.set_timesteps(timesteps=[int(t) for t in kept[::-1]])
  x_T, step_noise = noises(diffusion, keys)
  current = {}
  monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor",
                      lambda *args, **kwargs: to_torch(step_noise(current["i"])))

  def step_kwargs(k):
    current["i"] = len(kept) - 1 - k
    return {}

  assert_trajectories_match(ours, run_diffusers(scheduler, denoise, x_T, step_kwargs))


@pytest.mark.parametrize("schedule,num_timesteps,steps,mean_type", [
    ("linear", 1000, 50, MeanType.EPSILON), ("cosine", 1000, 20, MeanType.VELOCITY),
    ("linear", 100, 10, MeanType.START_X)])
@pytest.mark.parametrize("eta,clip", [(0.0, True), (0.5, False), (1.0, True)])
def test_ddim_matches_ddim_scheduler(schedule, num_timesteps, steps, mean_type, eta, clip):
  diffusion, alphas_cumprod, _ = make_process(schedule, num_timesteps, f"ddim{steps}", mean_type,
                                              VarType.FIXED_SMALL)
  denoise = functools.partial(fake_network, num_timesteps=num_timesteps, learned_variance=False)
  keys = jax.random.split(jax.random.key(1), 2)
  ours = run_jaxdiff(samplers.ddim_sample, diffusion, denoise, keys, eta=eta, clip_denoised=clip)

  scheduler = diffusers.DDIMScheduler(num_train_timesteps=num_timesteps, prediction_type=PREDICTION_TYPE[mean_type],
                                      clip_sample=clip, set_alpha_to_one=True, steps_offset=0,
                                      timestep_spacing="leading")
  scheduler.alphas_cumprod = torch.from_numpy(alphas_cumprod)
  scheduler.set_timesteps(steps)
  x_T, step_noise = noises(diffusion, keys)
  theirs = run_diffusers(scheduler, denoise, x_T, lambda k: {
      "eta": eta, "use_clipped_model_output": True, "variance_noise": to_torch(step_noise(steps - 1 - k))})
  assert_trajectories_match(ours, theirs)


@pytest.mark.parametrize("schedule,num_timesteps,steps", [("linear", 1000, 50), ("cosine", 1000, 20),
                                                           ("linear", 100, 10)])
def test_ddim_invert_matches_ddim_inverse_scheduler(schedule, num_timesteps, steps):
  """Every latent of the inversion. Step i of both takes eps at timestep tau_i from the latent at tau_{i-1} (x_0 at
  i = 0, diffusers' `set_alpha_to_one=True`); "ddimN" is `timestep_spacing='leading'`, `steps_offset=0` where N
  divides T (diffusers' step back is T // N). Epsilon prediction only: for x_0 and v outputs jaxdiff converts at
  tau_i, the level the network was asked about, diffusers at tau_{i-1} (which divides by sigma = 0 at i = 0)."""
  diffusion, alphas_cumprod, _ = make_process(schedule, num_timesteps, f"ddim{steps}", MeanType.EPSILON,
                                              VarType.FIXED_SMALL)
  denoise = functools.partial(fake_network, num_timesteps=num_timesteps, learned_variance=False)
  x0 = np.random.default_rng(3).uniform(-1, 1, (2,) + SHAPE).astype(np.float32)
  spy, seen = spy_on(diffusion, denoise)
  x_T = np.asarray(jax.jit(lambda d, x: samplers.ddim_invert(d, spy, x))(diffusion, x0))
  ours = [seen[i] for i in sorted(seen)] + [x_T]

  scheduler = diffusers.DDIMInverseScheduler(num_train_timesteps=num_timesteps, prediction_type="epsilon",
                                             clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                             timestep_spacing="leading")
  scheduler.alphas_cumprod = torch.from_numpy(alphas_cumprod)
  scheduler.set_timesteps(steps)
  assert_trajectories_match(ours, run_diffusers(scheduler, denoise, x0, lambda k: {}))


@pytest.mark.parametrize("schedule,num_timesteps,respacing,mean_type,var_type", [
    ("linear", 1000, "ddim20", MeanType.EPSILON, VarType.FIXED_SMALL),
    ("linear", 1000, "25", MeanType.START_X, VarType.FIXED_LARGE),
    ("cosine", 1000, "10,15,20", MeanType.VELOCITY, VarType.FIXED_SMALL),
    ("cosine", 4000, "ddim10", MeanType.EPSILON, VarType.LEARNED_RANGE),
    ("linear", 100, "", MeanType.EPSILON, VarType.FIXED_SMALL),
])
def test_dpm_solver_pp_matches_multistep_scheduler(schedule, num_timesteps, respacing, mean_type, var_type):
  diffusion, alphas_cumprod, kept = make_process(schedule, num_timesteps, respacing, mean_type, var_type)
  denoise = functools.partial(fake_network, num_timesteps=num_timesteps,
                              learned_variance=var_type == VarType.LEARNED_RANGE)
  keys = jax.random.split(jax.random.key(2), 2)
  ours = run_jaxdiff(samplers.dpm_solver_pp_sample, diffusion, denoise, keys, clip_denoised=False)

  scheduler = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=num_timesteps, prediction_type=PREDICTION_TYPE[mean_type], algorithm_type="dpmsolver++",
      solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
      variance_type=var_type.value if var_type == VarType.LEARNED_RANGE else None)
  scheduler.alphas_cumprod = torch.from_numpy(alphas_cumprod)
  scheduler.set_timesteps(timesteps=[int(t) for t in kept[::-1]])
  x_T, _ = noises(diffusion, keys)
  assert_trajectories_match(ours, run_diffusers(scheduler, denoise, x_T, lambda k: {}))
