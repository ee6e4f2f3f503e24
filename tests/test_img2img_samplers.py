"""img2img (SDEdit) and the base -> refiner handoff against diffusers' SDXL pipelines, run as they are.

StableDiffusionXLPipeline (denoising_end) and StableDiffusionXLImg2ImgPipeline (strength, denoising_start) run with a
fake UNet (a fixed nonlinear function of (x, t), evaluated in JAX for both sides), a tiny VAE they never call
(latents in, latents out) and given prompt embeddings, in float32 with the scheduler built from_config of SDXL's
scheduler config as a user swaps it in. jaxdiff's samplers run the steps `samplers.step_range` picks from the same
settings, from `samplers.sdedit_init` (the init noise is jaxdiff's draw, handed to diffusers' randn_tensor). Every
timestep the network sees must be diffusers', every x and the output within RTOL (max |a - b| / max |b|; diffusers'
float32 schedule is what is left: ~1e-6).
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jaxdiff.convert import scheduler as convert_scheduler
from jaxdiff.diffusion import create_diffusion, samplers, schedules
from jaxdiff.errors import ConfigError

torch = pytest.importorskip("torch", reason="parity tests need the torch extra: pip install torch==2.13.0")
diffusers = pytest.importorskip("diffusers", reason="parity tests need the torch extra (diffusers)")
pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (the refiner's is the same)
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False}
SHAPE = (8, 8, 4)  # one latent, NHWC
RTOL = 1e-5
ADD_TIME_DIM = 2  # the fake UNet's addition_time_embed_dim; pooled embeddings of width 4
EMBEDS = dict(prompt_embeds=torch.zeros(2, 3, 5), pooled_prompt_embeds=torch.zeros(2, 4))
# trailing30: DDIM lands between timesteps. DDPMScheduler (ancestral) at SDXL's own spacing only: its compiles are slow.
CASES = [("ddim", "leading", 20), ("ddim", "trailing", 30), ("dpm_solver++", "leading", 20),
         ("dpm_solver++", "trailing", 30), ("ancestral", "leading", 20)]


def network(x, t):
  """A smooth nonlinear eps of (x, network timestep t)."""
  s = (t.astype(jnp.float32) / 1000)[:, None, None, None]
  return jnp.tanh(0.8 * x + jnp.sin(3.0 * s + jnp.arange(x.shape[-1], dtype=jnp.float32))) + 0.3 * x * jnp.cos(2 * s)


def to_torch(x):
  return torch.from_numpy(np.moveaxis(np.asarray(x, np.float32), -1, 1).copy())


def to_numpy(x):
  return np.moveaxis(x.detach().numpy(), 1, -1).astype(np.float32)


class FakeUNet(torch.nn.Module):
  """What the SDXL pipelines read of a UNet; records every (timestep, x) it is called with."""

  def __init__(self, micro_values):
    super().__init__()
    self.config = types.SimpleNamespace(time_cond_proj_dim=None, addition_time_embed_dim=ADD_TIME_DIM, in_channels=4,
                                        sample_size=SHAPE[0])
    self.add_embedding = torch.nn.Module()
    self.add_embedding.linear_1 = torch.nn.Linear(micro_values * ADD_TIME_DIM + 4, 1)
    self.dtype, self.device, self.seen = torch.float32, torch.device("cpu"), []

  def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
    x = to_numpy(sample)
    self.seen.append((int(timestep), x))
    return (to_torch(network(jnp.asarray(x), jnp.full((x.shape[0],), int(timestep), jnp.int32))),)


@pytest.fixture(scope="module")
def vae():
  return diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                 up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                                 layers_per_block=1)


def process(sampler, spacing, steps):
  """The jaxdiff process of SDXL's scheduler config, through jaxdiff.convert.scheduler, and diffusers' scheduler."""
  cfg = dict(SDXL, timestep_spacing=spacing)
  overrides, sample = convert_scheduler.sampling_from_scheduler_config(cfg, sampler=sampler, steps=steps)
  diffusion_cfg = default.get_config().diffusion
  diffusion_cfg.update(overrides)
  diffusion = create_diffusion(diffusion_cfg, sample["timestep_respacing"], sampler=sampler,
                               steps_offset=sample["steps_offset"], set_alpha_to_one=sample["set_alpha_to_one"])
  return diffusion, lambda: getattr(diffusers, schedules.DIFFUSERS_SCHEDULERS[sampler]).from_config(cfg)


SEEN = []  # (network timestep, x) of every network call of the jaxdiff run in progress


def spy(x, t):
  jax.debug.callback(lambda t, x: SEEN.append((int(t), np.asarray(x))), t[0], x)
  return network(x, t)


# Module-level programs, so a setting compiles once (threefry alone compiles for seconds on a busy 2-core machine).
@functools.partial(jax.jit, static_argnames=("sampler", "start", "stop"))
def sample(diffusion, keys, x_init, *, sampler, start, stop):
  return samplers.get_sampler(sampler)(diffusion, spy, keys, SHAPE, clip_denoised=False, x_init=x_init,
                                       start=start, stop=stop)


sdedit_init = jax.jit(samplers.sdedit_init)  # the start index traced: one program for every strength
draw_x_T = jax.jit(lambda keys: samplers.per_sample_normal(samplers.split_keys(keys)[0], SHAPE))
draw_step_noise = jax.jit(samplers.step_noise, static_argnums=2)


def run_ours(sampler, diffusion, keys, *, x0=None, x_init=None, **settings):
  """[(network timestep, x) of every step] + [(None, output)] of a jaxdiff run with diffusers' settings, from x0
  noised by `sdedit_init`, from x_init, or (neither) from the x_T of `keys`."""
  steps = samplers.step_range(diffusion, num_train_timesteps=1000, **settings)
  assert steps.add_noise == (x0 is not None or x_init is None)
  if x0 is not None:
    x_init = sdedit_init(diffusion, keys, x0, steps.start)
  elif x_init is None:
    x_init = draw_x_T(keys)
  SEEN.clear()
  out = np.asarray(sample(diffusion, keys, jnp.asarray(x_init), sampler=sampler, start=steps.start, stop=steps.stop))
  return sorted(SEEN, key=lambda step: -step[0]) + [(None, out)]  # timesteps fall; callbacks may come in any order


class Diffusers:
  """diffusers' SDXL pipelines on the fake UNet; jaxdiff's noise goes to their randn_tensor calls."""

  def __init__(self, monkeypatch, vae, make_scheduler, diffusion, keys):
    self.vae, self.make_scheduler = vae, make_scheduler
    _, step_keys = samplers.split_keys(keys)
    self.x_T = to_torch(draw_x_T(keys))
    timestep_map = np.asarray(diffusion.timestep_map)
    self.unet = None
    # img2img's init noise is x_T's draw; DDPMScheduler's step noise that of jaxdiff's step at the same timestep.
    monkeypatch.setattr(diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img, "randn_tensor",
                        lambda *args, **kwargs: self.x_T.clone())
    monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda *args, **kwargs: to_torch(
        draw_step_noise(step_keys, jnp.int32(np.searchsorted(timestep_map, self.unet.seen[-1][0])), SHAPE)))

  def _run(self, cls, micro_values, steps, **kwargs):
    self.unet = FakeUNet(micro_values)
    pipe = cls(vae=self.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=self.unet,
               scheduler=self.make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(num_inference_steps=steps, guidance_scale=1.0, output_type="latent", **EMBEDS, **kwargs).images
    return self.unet.seen + [(None, to_numpy(out))]

  def base(self, steps, **kwargs):
    return self._run(diffusers.StableDiffusionXLPipeline, 6, steps, latents=self.x_T.clone(), height=SHAPE[0],
                     width=SHAPE[1], **kwargs)

  def img2img(self, steps, image, **kwargs):
    """The refiner's pipeline (aesthetic-score micro-conditioning: 5 values); schedules as the base's img2img."""
    return self._run(lambda **components: diffusers.StableDiffusionXLImg2ImgPipeline(
        **components, requires_aesthetics_score=True), 5, steps, image=to_torch(image), **kwargs)


def assert_runs_match(ours, theirs):
  """The same timesteps, and every x and the output within RTOL; returns the largest error."""
  assert [t for t, _ in ours] == [t for t, _ in theirs]
  errors = [np.max(np.abs(a - b)) / np.max(np.abs(b)) for (_, a), (_, b) in zip(ours, theirs)]
  assert max(errors) < RTOL, errors
  return max(errors)


@pytest.mark.parametrize("sampler,spacing,steps", CASES)
def test_img2img_strength_matches_sdxl_img2img_pipeline(monkeypatch, vae, sampler, spacing, steps):
  """SDEdit: x_0 noised (with x_T's noise) to the first of the int(N * strength) last timesteps, then the rest."""
  diffusion, make_scheduler = process(sampler, spacing, steps)
  keys = jax.random.split(jax.random.key(0), 2)
  theirs = Diffusers(monkeypatch, vae, make_scheduler, diffusion, keys)
  x0 = np.random.default_rng(0).normal(size=(2, *SHAPE)).astype(np.float32)
  for strength in (0.3, 0.75):
    ours = run_ours(sampler, diffusion, keys, x0=x0, strength=strength)
    assert len(ours) == int(steps * strength) + 1
    assert_runs_match(ours, theirs.img2img(steps, x0, strength=strength))


@pytest.mark.parametrize("sampler,spacing,steps", CASES)
def test_base_to_refiner_handoff_matches_sdxl_pipelines(monkeypatch, vae, sampler, spacing, steps):
  """(b) the base stops at denoising_end=0.8 and returns noisy latents; (c) the refiner continues from the base's
  latents as they are at denoising_start=0.8; (d) jaxdiff's base then refiner equals diffusers' base then refiner."""
  diffusion, make_scheduler = process(sampler, spacing, steps)
  keys = jax.random.split(jax.random.key(1), 2)
  theirs = Diffusers(monkeypatch, vae, make_scheduler, diffusion, keys)
  base_theirs = theirs.base(steps, denoising_end=0.8)
  base_ours = run_ours(sampler, diffusion, keys, denoising_end=0.8)
  assert_runs_match(base_ours, base_theirs)
  assert min(t for t, _ in base_ours[:-1]) >= 200  # cutoff = round(1000 - 0.8 * 1000)

  refiner_theirs = theirs.img2img(steps, base_theirs[-1][1], denoising_start=0.8)
  refiner_ours = run_ours(sampler, diffusion, keys, x_init=base_theirs[-1][1], denoising_start=0.8)
  assert_runs_match(refiner_ours, refiner_theirs)
  assert max(t for t, _ in refiner_ours[:-1]) < 200
  assert len(base_ours) + len(refiner_ours) == steps + 2  # every step once

  chained = run_ours(sampler, diffusion, keys, x_init=base_ours[-1][1], denoising_start=0.8)
  assert_runs_match(chained[-1:], refiner_theirs[-1:])
  # DDIM's and DDPM's state is x alone (step noise by step index): the handoff is the uninterrupted run. DPM-Solver++
  # restarts at first order without the previous x_0, as diffusers' fresh scheduler does (1e-3 off here).
  full = run_ours(sampler, diffusion, keys)[-1][1]
  error = np.max(np.abs(chained[-1][1] - full)) / np.max(np.abs(full))
  assert error > 1e-4 if sampler == "dpm_solver++" else error < RTOL


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("spacing", schedules.DIFFUSERS_SPACINGS)
def test_step_range_is_get_timesteps(sampler, spacing):
  """Every setting on a grid: the timesteps jaxdiff runs are those of the img2img pipeline's get_timesteps (called
  on a real scheduler) cut at denoising_end as its __call__ does."""
  scheduler = getattr(diffusers, schedules.DIFFUSERS_SCHEDULERS[sampler]).from_config(
      dict(SDXL, timestep_spacing=spacing))
  pipe = types.SimpleNamespace(scheduler=scheduler)
  for steps in (1, 4, 7, 20, 25, 50):
    kept = schedules.space_timesteps(1000, f"{spacing}{steps}", sampler=sampler, steps_offset=1)
    diffusion = types.SimpleNamespace(timestep_map=kept, num_timesteps=len(kept))
    for strength, start, end in [(1.0, 0.0, 1.0), (0.3, 0.0, 1.0), (0.75, 0.0, 1.0), (0.5, 0.0, 0.9), (1.0, 0.0, 0.8),
                                 (0.4, 0.8, 1.0), (1.0, 0.8, 1.0), (1.0, 0.5, 0.9), (1.0, 0.013, 1.0)]:
      scheduler.set_timesteps(steps)
      theirs, _ = diffusers.StableDiffusionXLImg2ImgPipeline.get_timesteps(
          pipe, steps, strength, "cpu", denoising_start=start or None)
      theirs = [int(t) for t in theirs if end == 1.0 or t >= int(round(1000 - end * 1000))]
      if not theirs:
        with pytest.raises(ConfigError, match="sample.(strength|denoising_start|denoising_end)="):
          samplers.step_range(diffusion, num_train_timesteps=1000, strength=strength, denoising_start=start,
                              denoising_end=end)
        continue
      run = samplers.step_range(diffusion, num_train_timesteps=1000, strength=strength, denoising_start=start,
                                denoising_end=end)
      assert kept[run.stop:run.start + 1][::-1].tolist() == theirs, (steps, strength, start, end)
      assert run.add_noise == (start == 0)


def test_sdedit_init_is_per_sample_and_bad_settings_are_refused():
  diffusion, _ = process("ddim", "leading", 10)
  keys = jax.random.split(jax.random.key(2), 2)
  x0 = jnp.asarray(np.random.default_rng(1).normal(size=(2, *SHAPE)), jnp.float32)
  both = sdedit_init(diffusion, keys, x0, 4)
  np.testing.assert_array_equal(sdedit_init(diffusion, keys[1:], x0[1:], 4), both[1:])
  np.testing.assert_allclose(both, diffusion.sqrt_alphas_cumprod[4] * x0 + diffusion.sqrt_one_minus_alphas_cumprod[4]
                             * draw_x_T(keys), rtol=1e-6, atol=1e-6)
  assert samplers.step_range(diffusion, num_train_timesteps=1000) == (9, 0, True)
  # DDPMScheduler.from_config(SDXL) samples with its default variance_type.
  assert convert_scheduler.sampling_from_scheduler_config(SDXL, sampler="ancestral")[0]["var_type"] == "fixed_small"
  for settings, match in [(dict(strength=0.05), "sample.strength=0.05 runs none"),
                          (dict(strength=0.0), "sample.strength must be in"),
                          (dict(denoising_start=0.8, denoising_end=0.5), "must be below sample.denoising_end"),
                          (dict(denoising_end=0.0), "sample.denoising_end must be in"),
                          (dict(denoising_start=1.0), "sample.denoising_start must be in")]:
    with pytest.raises(ConfigError, match=match) as info:
      samplers.step_range(diffusion, num_train_timesteps=1000, **settings)
    assert "\n" not in str(info.value)
  for start, stop in [(10, 0), (3, 4), (2.0, 0)]:
    with pytest.raises(ConfigError, match="start"):
      samplers.ddim_sample(diffusion, lambda x, t: x, keys, SHAPE, start=start, stop=stop)
  with pytest.raises(ConfigError, match="init images/latents of that size"):
    samplers.dpm_solver_pp_sample(diffusion, lambda x, t: x, keys, SHAPE, x_init=jnp.zeros((3, 4, 4, 4)))
