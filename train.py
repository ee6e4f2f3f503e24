"""Trains a diffusion model: python train.py --config configs/ddpm_mnist.py --workdir runs/mnist"""

from absl import app

from jaxdiff import cli


def main(argv):
  cli.main(argv, job="train")


if __name__ == "__main__":
  cli.define_flags()
  app.run(main, flags_parser=cli.parse_flags)
