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
- Stable Diffusion: the "leadingN" / "trailingN" / "linspaceN" spacings, steps_offset and set_alpha_to_one run
  against schedulers built `from_config` of SD 1.5 / 2.1 scheduler configs, through jaxdiff.convert.scheduler; the
  processes there are made by `create_diffusion` as sampling makes them.
The network is a fixed nonlinear function of (x, t) evaluated in JAX for both. Every x_t the network sees and the
final sample must agree within 1e-5 relative error (max |a - b| / max |b|).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jaxdiff.convert import scheduler as convert_scheduler
from jaxdiff.diffusion import GaussianDiffusion, MeanType, VarType, create_diffusion, schedules
from jaxdiff.diffusion import samplers
from jaxdiff.errors import CheckpointError, ConfigError

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


def to_torch(x, dtype=np.float64):
  return torch.from_numpy(np.moveaxis(np.asarray(x, dtype), -1, 1).copy())


def to_numpy(x):
  return np.moveaxis(x.numpy(), 1, -1).astype(np.float32)


def run_diffusers(scheduler, denoise, x_T, step_kwargs, dtype=torch.float64):
  """Every x the network saw and the final sample; step_kwargs(k) gives extra `step` arguments of step k."""
  dtype = np.float64 if dtype == torch.float64 else np.float32
  sample = to_torch(x_T, dtype)
  seen = []
  for k, t in enumerate(scheduler.timesteps):
    x = to_numpy(sample)
    seen.append(x)
    out = denoise(jnp.asarray(x), jnp.full((x.shape[0],), int(t), jnp.int32))
    sample = scheduler.step(to_torch(out, dtype), t, sample, **step_kwargs(k)).prev_sample
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


# Stable Diffusion: the scaled_linear schedule, diffusers' timestep spacings, steps_offset and set_alpha_to_one, and
# scheduler_config.json files mapped by jaxdiff.convert.scheduler.
SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as written by diffusers 0.6
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SD21 = {  # stabilityai/stable-diffusion-2-1 (768, v-prediction)
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SCHEDULER_CLASSES = schedules.DIFFUSERS_SCHEDULERS


def test_scaled_linear_matches_diffusers_float32_schedule():
  """jaxdiff forms SD's schedule in float64; diffusers in float32, 2e-7 off in beta and ~1e-6 in alphas_cumprod."""
  ours = schedules.get_betas("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
  scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  np.testing.assert_allclose(ours, scheduler.betas.numpy(), rtol=1e-6)
  np.testing.assert_allclose(np.cumprod(1 - ours), scheduler.alphas_cumprod.numpy(), rtol=3e-6)
  np.testing.assert_allclose(ours[[0, -1]], [0.00085, 0.012], rtol=1e-12)


@pytest.mark.parametrize("sampler", sorted(SCHEDULER_CLASSES))
@pytest.mark.parametrize("spacing", schedules.DIFFUSERS_SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1, 3])
def test_diffusers_spacings_match_set_timesteps(sampler, spacing, steps_offset):
  """Step counts of a 1000-step process: the same timesteps, or a ConfigError where diffusers' are not distinct
  timesteps in [0, T) (e.g. "trailing61" ends at -1)."""
  scheduler = getattr(diffusers, SCHEDULER_CLASSES[sampler])(timestep_spacing=spacing, steps_offset=steps_offset)
  for steps in [*range(1, 130), 250, 333, 500, 998, 999, 1000]:
    scheduler.set_timesteps(steps)
    theirs = scheduler.timesteps.numpy()
    if len(set(theirs)) == len(theirs) and theirs.min() >= 0 and theirs.max() < 1000:
      kept = schedules.space_timesteps(1000, f"{spacing}{steps}", sampler=sampler, steps_offset=steps_offset)
      np.testing.assert_array_equal(kept, np.sort(theirs), err_msg=f"{spacing}{steps}")
    else:
      with pytest.raises(ConfigError, match=f"timestep_respacing={spacing}{steps} "):
        schedules.space_timesteps(1000, f"{spacing}{steps}", sampler=sampler, steps_offset=steps_offset)


def sd_process(scheduler_cfg, sampler, steps):
  """The jaxdiff process of a scheduler config, through jaxdiff.convert.scheduler as a user gets it."""
  diffusion_overrides, sample = convert_scheduler.sampling_from_scheduler_config(scheduler_cfg, sampler=sampler,
                                                                                 steps=steps)
  diffusion_cfg = default.get_config().diffusion
  diffusion_cfg.update(diffusion_overrides)
  diffusion = create_diffusion(diffusion_cfg, sample["timestep_respacing"], sampler=sampler,
                               steps_offset=sample["steps_offset"], set_alpha_to_one=sample["set_alpha_to_one"])
  alphas_cumprod = np.cumprod(1 - schedules.get_betas("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012))
  return diffusion, alphas_cumprod, sample


@pytest.mark.parametrize("spacing,steps,prediction_type,eta", [
    ("leading", 10, "epsilon", 0.0), ("leading", 10, "v_prediction", 0.0), ("leading", 50, "epsilon", 0.0),
    ("leading", 50, "v_prediction", 0.0),
    ("trailing", 15, "v_prediction", 0.0),  # 1000 / 15 is no integer: each step lands 33 below where the next starts
    ("linspace", 10, "epsilon", 1.0),  # steps to t - 100 from 0, 111, ...; eta = 1 adds noise into alphas_cumprod[0]
])
def test_ddim_matches_stable_diffusion_ddim_scheduler(spacing, steps, prediction_type, eta):
  """SD 2.1's DDIMScheduler config (steps_offset=1, set_alpha_to_one=False, clip_sample=False): "leadingN" with
  steps_offset 1 visits 1 + k * T // N and the last step lands on alphas_cumprod[0]."""
  cfg = dict(SD21, prediction_type=prediction_type, timestep_spacing=spacing)
  diffusion, alphas_cumprod, sample = sd_process(cfg, "ddim", steps)
  assert sample == dict(sampler="ddim", timestep_respacing=f"{spacing}{steps}", steps_offset=1,
                        set_alpha_to_one=False, clip_denoised=False)
  denoise = functools.partial(fake_network, num_timesteps=1000, learned_variance=False)
  keys = jax.random.split(jax.random.key(4), 2)
  ours = run_jaxdiff(samplers.ddim_sample, diffusion, denoise, keys, eta=eta, clip_denoised=False)

  scheduler = diffusers.DDIMScheduler.from_config(cfg)
  assert (scheduler.config.timestep_spacing, scheduler.config.set_alpha_to_one) == (spacing, False)
  scheduler.alphas_cumprod = torch.from_numpy(alphas_cumprod)
  scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
  scheduler.set_timesteps(steps)
  np.testing.assert_array_equal(np.asarray(diffusion.timestep_map)[::-1], scheduler.timesteps.numpy())
  x_T, step_noise = noises(diffusion, keys)
  theirs = run_diffusers(scheduler, denoise, x_T, lambda k: {"eta": eta, "variance_noise": to_torch(
      step_noise(steps - 1 - k))})
  assert_trajectories_match(ours, theirs)


@pytest.mark.parametrize("spacing,steps,prediction_type", [
    (None, 10, "epsilon"), (None, 10, "v_prediction"), (None, 20, "epsilon"), (None, 20, "v_prediction"),
    ("trailing", 20, "epsilon"), ("leading", 10, "epsilon")])
def test_dpm_solver_pp_matches_stable_diffusion_multistep_scheduler(spacing, steps, prediction_type):
  """DPMSolverMultistepScheduler.from_config(SD 1.5's PNDM config), as SD users swap it in: its own defaults fill
  what the config lacks (linspace spacing, final_sigmas_type='zero', lower_order_final), steps_offset=1 shifts
  "leadingN" only, set_alpha_to_one is not read."""
  cfg = dict(SD15, prediction_type=prediction_type, **({"timestep_spacing": spacing} if spacing else {}))
  diffusion, alphas_cumprod, sample = sd_process(cfg, "dpm_solver++", steps)
  assert sample["timestep_respacing"] == f"{spacing or 'linspace'}{steps}" and not sample["clip_denoised"]
  denoise = functools.partial(fake_network, num_timesteps=1000, learned_variance=False)
  keys = jax.random.split(jax.random.key(5), 2)
  ours = run_jaxdiff(samplers.dpm_solver_pp_sample, diffusion, denoise, keys, clip_denoised=False)

  scheduler = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
  scheduler.alphas_cumprod = torch.from_numpy(alphas_cumprod)  # set_timesteps forms its sigmas from these
  scheduler.set_timesteps(steps)
  np.testing.assert_array_equal(np.asarray(diffusion.timestep_map)[::-1], scheduler.timesteps.numpy())
  x_T, _ = noises(diffusion, keys)
  assert_trajectories_match(ours, run_diffusers(scheduler, denoise, x_T, lambda k: {}))


@pytest.mark.parametrize("name,steps", [("ddim", 50), ("dpm_solver++", 20)])
def test_float32_diffusers_as_pipelines_run_it(name, steps):
  """StableDiffusionPipeline runs the scheduler in float32 from its float32 alphas_cumprod: jaxdiff stays within
  RTOL of that too (1.3e-6 measured; what is left is diffusers' rounding, which the tests above take out)."""
  diffusion, _, _ = sd_process(SD15, name, steps)
  denoise = functools.partial(fake_network, num_timesteps=1000, learned_variance=False)
  keys = jax.random.split(jax.random.key(6), 2)
  sampler = samplers.ddim_sample if name == "ddim" else samplers.dpm_solver_pp_sample
  ours = run_jaxdiff(sampler, diffusion, denoise, keys, clip_denoised=False)
  cls = diffusers.DDIMScheduler if name == "ddim" else diffusers.DPMSolverMultistepScheduler
  scheduler = cls.from_config(SD15)
  scheduler.set_timesteps(steps)
  x_T, _ = noises(diffusion, keys)
  theirs = run_diffusers(scheduler, denoise, x_T, lambda k: {}, dtype=torch.float32)
  assert_trajectories_match(ours, theirs)


def test_scheduler_configs_of_stable_diffusion():
  diffusion, sample = convert_scheduler.sampling_from_scheduler_config(SD15)
  assert diffusion == dict(num_timesteps=1000, schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           mean_type="epsilon")
  assert sample == dict(steps_offset=1, set_alpha_to_one=False, clip_denoised=False)  # PNDM: no jaxdiff sampler
  _, ddim = convert_scheduler.sampling_from_scheduler_config(SD15, sampler="ddim", steps=50)
  assert ddim["timestep_respacing"] == "leading50" and ddim["sampler"] == "ddim"
  diffusion, sample = convert_scheduler.sampling_from_scheduler_config(SD21, steps=25)
  assert diffusion["mean_type"] == "v" and sample == dict(sampler="ddim", timestep_respacing="leading25",
                                                          steps_offset=1, set_alpha_to_one=False, clip_denoised=False)
  # A DDIM config without clip_sample clips, as DDIMScheduler.from_config of it does.
  _, sample = convert_scheduler.sampling_from_scheduler_config({"_class_name": "DDIMScheduler"}, steps=10)
  assert sample == dict(sampler="ddim", timestep_respacing="leading10", steps_offset=0, set_alpha_to_one=True,
                        clip_denoised=True)
  diffusion, sample = convert_scheduler.sampling_from_scheduler_config(
      {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range"})
  assert diffusion == dict(num_timesteps=1000, schedule="cosine", mean_type="epsilon", var_type="learned_range")
  assert sample["sampler"] == "ancestral"
  _, sample = convert_scheduler.sampling_from_scheduler_config(
      dict(SD15, _class_name="EulerDiscreteScheduler", timestep_spacing="trailing"), sampler="dpm_solver++", steps=8)
  assert sample["timestep_respacing"] == "trailing8"
  assert convert_scheduler.respacing_for("linspace", 30) == "linspace30"


@pytest.mark.parametrize("cfg,sampler", [(SD15, "ddim"), (SD15, "dpm_solver++"), (SD21, "ddim"),
                                         (SD21, "dpm_solver++"), (dict(SD21, timestep_spacing="trailing"), "ddim")])
def test_scheduler_config_timesteps_are_those_of_from_config(cfg, sampler):
  diffusion, sample = convert_scheduler.sampling_from_scheduler_config(cfg, sampler=sampler, steps=30)
  scheduler = getattr(diffusers, SCHEDULER_CLASSES[sampler]).from_config(cfg)
  scheduler.set_timesteps(30)
  kept = schedules.space_timesteps(diffusion["num_timesteps"], sample["timestep_respacing"], sampler=sampler,
                                   steps_offset=sample["steps_offset"])
  np.testing.assert_array_equal(kept, np.sort(scheduler.timesteps.numpy()))


@pytest.mark.parametrize("changes,sampler,error,match", [
    ({"trained_betas": [0.1, 0.2]}, None, CheckpointError, "trained_betas"),
    ({"beta_schedule": "sigmoid"}, None, CheckpointError, "beta_schedule='sigmoid'"),
    ({"prediction_type": "flow_prediction"}, None, CheckpointError, "prediction_type='flow_prediction'"),
    ({"rescale_betas_zero_snr": True}, None, CheckpointError, "rescale_betas_zero_snr"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, None, CheckpointError, "does not sample a DDPM"),
    ({"variance_type": "learned"}, None, CheckpointError, "variance_type='learned'"),
    ({"steps_offset": -1}, None, CheckpointError, "steps_offset=-1"),
    ({"thresholding": True}, "ddim", CheckpointError, "thresholding"),
    ({"clip_sample": True, "clip_sample_range": 2.0}, "ddim", CheckpointError, "clip_sample_range"),
    ({"use_karras_sigmas": True}, "dpm_solver++", CheckpointError, "use_karras_sigmas=True"),
    ({"final_sigmas_type": "sigma_min"}, "dpm_solver++", CheckpointError, "final_sigmas_type='sigma_min'"),
    ({"algorithm_type": "sde-dpmsolver++"}, "dpm_solver++", CheckpointError, "algorithm_type"),
    ({"timestep_spacing": "uniform"}, "ddim", CheckpointError, "timestep_spacing='uniform'"),
    ({}, "heun", ConfigError, "Unknown sampler 'heun'"),
])
def test_bad_scheduler_configs_are_refused_in_one_line(changes, sampler, error, match):
  with pytest.raises(error, match=match) as info:
    convert_scheduler.sampling_from_scheduler_config(dict(SD15, **changes), sampler=sampler, steps=20)
  assert "\n" not in str(info.value)


def test_steps_need_a_sampler_for_a_class_without_one():
  with pytest.raises(ConfigError, match='pass sampler="ddim" or "dpm_solver\\+\\+"'):
    convert_scheduler.sampling_from_scheduler_config(SD15, steps=20)
  with pytest.raises(ConfigError, match="integer >= 1"):
    convert_scheduler.respacing_for("leading", 0)
