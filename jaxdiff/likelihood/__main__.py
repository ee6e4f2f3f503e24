"""Entry point of `python -m jaxdiff.likelihood` (the job is jaxdiff/likelihood/__init__.py)."""

import functools

from absl import app

from jaxdiff import cli

if __name__ == "__main__":
  cli.define_flags(job="likelihood")
  app.run(functools.partial(cli.main, job="likelihood"), flags_parser=cli.parse_flags)
