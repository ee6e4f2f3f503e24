"""diffusers scheduler configs (a pipeline's `scheduler/scheduler_config.json`) -> jaxdiff `diffusion` and `sample`.

  with open('sd15/scheduler/scheduler_config.json') as f:
    diffusion, sample = sampling_from_scheduler_config(json.load(f), sampler='dpm_solver++', steps=20)
  config.diffusion.update(diffusion)
  config.sample.update(sample)

The training process (num_train_timesteps, beta schedule, prediction_type) maps onto `diffusion`. The sampling options
map onto `sample` as diffusers' scheduler of the chosen jaxdiff sampler reads them when it is built `from_config` of
this config (DDIMScheduler for ddim, DPMSolverMultistepScheduler for dpm_solver++, DDPMScheduler for ancestral): a
key the config lacks takes that class's default, as `from_config` does. So SD 1.5's PNDM config gives 'leading'
spacing and clip_denoised=True to DDIM (its clip_sample=false is in the file: False), and 'linspace' to DPM-Solver++.

The sampler defaults to the one of the config's own class. PNDMScheduler (SD 1.x's) and the Euler, LMS, Heun, UniPC,
... schedulers have no jaxdiff sampler: their config gives the training process and the keys every sampler reads,
and the caller picks ddim or dpm_solver++, as a diffusers user swaps `pipe.scheduler` for
`DDIMScheduler.from_config(pipe.scheduler.config)`. Options that jaxdiff would not reproduce are refused by name
(CheckpointError). One difference stays: with clip_sample=True, jaxdiff's DDIM re-derives eps from the clipped x_0
(diffusers' use_clipped_model_output=True), which diffusers' pipelines do not ask for.
"""

import math

from jaxdiff.diffusion import schedules
from jaxdiff.errors import CheckpointError, ConfigError

# The jaxdiff sampler of each diffusers class that has one.
SAMPLER_OF_CLASS = {'DDPMScheduler': 'ancestral', 'DDIMScheduler': 'ddim',
                    'DPMSolverMultistepScheduler': 'dpm_solver++'}
# Schedulers over the DDPM process of a beta schedule, whose training process jaxdiff can take over.
DDPM_CLASSES = (*SAMPLER_OF_CLASS, 'PNDMScheduler', 'EulerDiscreteScheduler', 'EulerAncestralDiscreteScheduler',
                'LMSDiscreteScheduler', 'HeunDiscreteScheduler', 'KDPM2DiscreteScheduler',
                'KDPM2AncestralDiscreteScheduler', 'UniPCMultistepScheduler', 'DEISMultistepScheduler',
                'DPMSolverSinglestepScheduler', 'DPMSolverSDEScheduler')
BETA_SCHEDULES = {'linear': 'linear', 'scaled_linear': 'scaled_linear', 'squaredcos_cap_v2': 'cosine'}
MEAN_TYPES = {'epsilon': 'epsilon', 'v_prediction': 'v', 'sample': 'x0'}
VAR_TYPES = {'fixed_small': 'fixed_small', 'fixed_small_log': 'fixed_small', 'fixed_large': 'fixed_large',
             'fixed_large_log': 'fixed_large', 'learned_range': 'learned_range'}
# Each diffusers class's defaults of what it reads here (from_config fills a missing key with them).
DEFAULT_SPACING = {'ancestral': 'leading', 'ddim': 'leading', 'dpm_solver++': 'linspace'}
DEFAULT_CLIP = {'ancestral': True, 'ddim': True, 'dpm_solver++': False}
# DPMSolverMultistepScheduler options jaxdiff's DPM-Solver++(2M) reproduces at these values only.
DPM_SUPPORTED = dict(algorithm_type=('dpmsolver++',), solver_order=(2,), solver_type=('midpoint',),
                     final_sigmas_type=('zero',), use_karras_sigmas=(False,), use_exponential_sigmas=(False,),
                     use_beta_sigmas=(False,), use_lu_lambdas=(False,), use_flow_sigmas=(False,),
                     lambda_min_clipped=(-math.inf,), use_dynamic_shifting=(False,))


def sampling_from_scheduler_config(cfg: dict, *, sampler: str | None = None,
                                   steps: int | None = None) -> tuple[dict, dict]:
  """(diffusion overrides, sample overrides) reproducing a diffusers scheduler config (see the module docstring).

  diffusion: num_timesteps, schedule (+ beta_start/beta_end for the linear ones), mean_type, and var_type where the
  config names a variance_type (for ancestral also where it does not: DDPMScheduler's 'fixed_small'). sample:
  steps_offset, set_alpha_to_one, clip_denoised, and with a sampler (given, or the config class's) `sampler`; with
  `steps` too, timestep_respacing (`respacing_for`).
  """
  name = cfg.get('_class_name', 'the scheduler')
  if cfg.get('_class_name') is not None and name not in DDPM_CLASSES:
    raise CheckpointError(f'{name} does not sample a DDPM beta schedule: jaxdiff reads the configs of '
                          f'{", ".join(DDPM_CLASSES)}.')
  diffusion = _process(cfg, name)
  sampler = sampler or SAMPLER_OF_CLASS.get(name)
  sample = {'steps_offset': cfg.get('steps_offset', 0), 'set_alpha_to_one': cfg.get('set_alpha_to_one', True)}
  if not isinstance(sample['steps_offset'], int) or sample['steps_offset'] < 0:
    raise CheckpointError(f'{name} steps_offset={sample["steps_offset"]!r} is not an integer >= 0.')
  if sampler is None:
    if steps is not None:
      raise ConfigError(f'{name} has no jaxdiff sampler: pass sampler="ddim" or "dpm_solver++" with steps={steps}.')
    sample['clip_denoised'] = bool(cfg.get('clip_sample', True))
    return diffusion, sample
  if sampler not in DEFAULT_SPACING:
    raise ConfigError(f'Unknown sampler {sampler!r}: use one of {", ".join(DEFAULT_SPACING)}.')
  _check_sampler_options(cfg, name, sampler)
  sample['sampler'] = sampler
  if sampler == 'ancestral':  # the variance DDPMScheduler.from_config(cfg) samples with (SD/SDXL configs name none)
    diffusion.setdefault('var_type', 'fixed_small')
  # DPMSolverMultistepScheduler has no clip_sample; thresholding, its only clipping, is refused above.
  sample['clip_denoised'] = bool(cfg.get('clip_sample', True)) if DEFAULT_CLIP[sampler] else False
  if steps is not None:
    sample['timestep_respacing'] = respacing_for(timestep_spacing(cfg, sampler), steps)
  return diffusion, sample


def timestep_spacing(cfg: dict, sampler: str) -> str:
  """The `timestep_spacing` that diffusers' scheduler of `sampler` built from_config of `cfg` uses."""
  spacing = cfg.get('timestep_spacing', DEFAULT_SPACING[sampler])
  if spacing not in schedules.DIFFUSERS_SPACINGS:
    raise CheckpointError(f'{cfg.get("_class_name", "the scheduler")} timestep_spacing={spacing!r} is not one of '
                          f'{", ".join(schedules.DIFFUSERS_SPACINGS)}.')
  return spacing


def respacing_for(spacing: str, steps: int) -> str:
  """The sample.timestep_respacing of `steps` steps spaced as diffusers' `timestep_spacing=spacing`: 'leading50'."""
  if spacing not in schedules.DIFFUSERS_SPACINGS:
    raise ConfigError(f'Unknown timestep spacing {spacing!r}: use one of {", ".join(schedules.DIFFUSERS_SPACINGS)}.')
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
    raise ConfigError(f'The number of sampling steps must be an integer >= 1, got {steps!r}.')
  return f'{spacing}{steps}'


def _process(cfg: dict, name: str) -> dict:
  """The `diffusion` overrides of the training process the config describes."""
  if cfg.get('trained_betas') is not None:
    raise CheckpointError(f'{name} has trained_betas (an explicit beta list), which no jaxdiff diffusion.schedule '
                          f'expresses: use a config with beta_schedule one of {", ".join(BETA_SCHEDULES)}.')
  if cfg.get('rescale_betas_zero_snr', False):
    raise CheckpointError(f'{name} rescale_betas_zero_snr=True (zero terminal SNR) is not a jaxdiff schedule: set it '
                          'to false to sample with the schedule the model was trained with.')
  beta_schedule = cfg.get('beta_schedule', 'linear')
  if beta_schedule not in BETA_SCHEDULES:
    raise CheckpointError(f'{name} beta_schedule={beta_schedule!r} is not a jaxdiff schedule: use one of '
                          f'{", ".join(BETA_SCHEDULES)}.')
  prediction_type = cfg.get('prediction_type', 'epsilon')
  if prediction_type not in MEAN_TYPES:
    raise CheckpointError(f'{name} prediction_type={prediction_type!r} is not a jaxdiff diffusion.mean_type: use one '
                          f'of {", ".join(MEAN_TYPES)}.')
  num_timesteps = cfg.get('num_train_timesteps', 1000)
  if not isinstance(num_timesteps, int) or num_timesteps < 1:
    raise CheckpointError(f'{name} num_train_timesteps={num_timesteps!r} is not an integer >= 1.')
  diffusion = {'num_timesteps': num_timesteps, 'schedule': BETA_SCHEDULES[beta_schedule],
               'mean_type': MEAN_TYPES[prediction_type]}
  if diffusion['schedule'] != 'cosine':
    diffusion['beta_start'] = float(cfg.get('beta_start', 0.0001))
    diffusion['beta_end'] = float(cfg.get('beta_end', 0.02))
  variance_type = cfg.get('variance_type')
  if variance_type is not None:
    if variance_type not in VAR_TYPES:
      raise CheckpointError(f'{name} variance_type={variance_type!r} is not a jaxdiff diffusion.var_type: use one of '
                            f'{", ".join(VAR_TYPES)}.')
    diffusion['var_type'] = VAR_TYPES[variance_type]
  return diffusion


def _check_sampler_options(cfg: dict, name: str, sampler: str):
  """Refuses what the sampler's diffusers scheduler would do, built from_config of `cfg`, and jaxdiff's does not."""
  if cfg.get('thresholding', False):
    raise CheckpointError(f'{name} thresholding=True (dynamic thresholding) is not a jaxdiff sampler option: set it '
                          'to false (sample.clip_denoised clips x_0 to [-1, 1]).')
  if sampler == 'dpm_solver++':
    for key, allowed in DPM_SUPPORTED.items():
      if cfg.get(key, allowed[0]) not in allowed:
        raise CheckpointError(f'DPMSolverMultistepScheduler {key}={cfg[key]!r} is not what jaxdiff\'s dpm_solver++ '
                              f'runs ({key}={allowed[0]!r}).')
  elif cfg.get('clip_sample', True) and cfg.get('clip_sample_range', 1.0) != 1.0:
    raise CheckpointError(f'{name} clip_sample_range={cfg["clip_sample_range"]!r}: jaxdiff clips x_0 to [-1, 1] only; '
                          'set clip_sample to false or clip_sample_range to 1.0.')
