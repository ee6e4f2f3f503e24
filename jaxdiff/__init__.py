"""jaxdiff: diffusion models in JAX/Flax, from DDPM to SDXL."""

__version__ = "0.1.0"


def load_pipeline(path: str, **kwargs):
  """A text-to-image pipeline from a local folder or checkpoint file: see jaxdiff.pipeline.load_pipeline."""
  from jaxdiff import pipeline  # imported on use: `import jaxdiff` stays light
  return pipeline.load_pipeline(path, **kwargs)
