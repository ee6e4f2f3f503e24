"""The diffusion process: schedules, the Gaussian process, its losses and samplers."""

from jaxdiff.diffusion.gaussian import (GaussianDiffusion, LossType, MeanType, VarType, create_diffusion,
                                        parse_loss)
from jaxdiff.diffusion.samplers import (ancestral_sample, ddim_invert, ddim_sample, dpm_solver_pp_sample,
                                        get_sampler)
from jaxdiff.diffusion.schedules import get_betas, space_timesteps
from jaxdiff.diffusion.timesteps import LossHistory, TimestepSampler, parse_timestep_sampler
