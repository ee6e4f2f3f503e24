"""Trains a diffusion model: python train.py --config configs/ddpm_mnist.py --workdir runs/mnist"""

import functools

from absl import app

from jaxdiff import cli

if __name__ == "__main__":
  cli.define_flags(job="train")
  app.run(functools.partial(cli.main, job="train"), flags_parser=cli.parse_flags)
