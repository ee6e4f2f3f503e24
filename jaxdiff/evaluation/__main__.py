"""Entry point of `python -m jaxdiff.evaluation`."""

from jaxdiff.evaluation import cli

if __name__ == '__main__':
  cli.main()
