"""Writes a PyTorch checkpoint as a jaxdiff (orbax) checkpoint that `sample.py --workdir` restores.

  python -m jaxdiff.convert --from=64x64_diffusion.pt --config=configs/adm_imagenet64.py --workdir=runs/adm64
  python sample.py --config=configs/adm_imagenet64.py --workdir=runs/adm64
"""

import jax
from absl import app, flags

from jaxdiff import cli, convert
from jaxdiff.errors import UserError
from jaxdiff.train import mesh as mesh_lib

flags.DEFINE_string("from", None, "A guided-/improved-diffusion .pt/.safetensors file or a diffusers model folder.")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}: flags take the form --name=value.")
  try:
    mesh_lib.initialize_distributed(cli.FLAGS.config.distributed)
    directory = convert.write_checkpoint(cli.FLAGS["from"].value, cli.FLAGS.config, cli.FLAGS.workdir)
  except UserError as e:
    cli.fail(str(e))
  if jax.process_index() != 0:  # process 0 reports for the whole run
    return
  print(f"Wrote {directory}/0: sample with python sample.py --config=<the same config> --workdir={cli.FLAGS.workdir}")


if __name__ == "__main__":
  cli.define_flags()
  flags.mark_flag_as_required("from")
  app.run(main, flags_parser=cli.parse_flags)
