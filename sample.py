"""Samples from a trained run: python sample.py --config configs/ddpm_mnist.py --workdir runs/mnist"""

import functools

from absl import app

from jaxdiff import cli

if __name__ == "__main__":
  cli.define_flags(job="sample")
  app.run(functools.partial(cli.main, job="sample"), flags_parser=cli.parse_flags)
