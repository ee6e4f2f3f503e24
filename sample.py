"""Samples from a trained run: python sample.py --config configs/ddpm_mnist.py --workdir runs/mnist"""

from absl import app

from jaxdiff import cli


def main(argv):
  cli.main(argv, job="sample")


if __name__ == "__main__":
  cli.define_flags()
  app.run(main, flags_parser=cli.parse_flags)
