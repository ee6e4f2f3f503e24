"""Entry point of `python -m jaxdiff.likelihood` (see jaxdiff/likelihood/__init__.py)."""

from absl import app

from jaxdiff import cli


def main(argv):
  cli.main(argv, job="likelihood")


if __name__ == "__main__":
  cli.define_flags()
  app.run(main, flags_parser=cli.parse_flags)
