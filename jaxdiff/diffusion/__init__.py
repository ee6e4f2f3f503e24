"""The diffusion process: schedules, the Gaussian process and its samplers."""

from jaxdiff.diffusion.gaussian import GaussianDiffusion, MeanType, VarType, create_diffusion
from jaxdiff.diffusion.samplers import ancestral_sample
from jaxdiff.diffusion.schedules import get_betas
