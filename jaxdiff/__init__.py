"""jaxdiff: diffusion models in JAX/Flax, from DDPM to SDXL."""

__version__ = "0.1.0"
