"""Writes a PyTorch checkpoint as a jaxdiff (orbax) checkpoint that `sample.py --workdir` restores.

  python -m jaxdiff.convert --from=64x64_diffusion.pt --config=configs/adm_imagenet64.py --workdir=runs/adm64
  python sample.py --config=configs/adm_imagenet64.py --workdir=runs/adm64
"""

import functools

from absl import app

from jaxdiff import cli

if __name__ == "__main__":
  cli.define_flags(job="convert")
  app.run(functools.partial(cli.main, job="convert"), flags_parser=cli.parse_flags)
