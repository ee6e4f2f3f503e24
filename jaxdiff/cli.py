"""What train.py and sample.py share: flags, config loading, one-line errors and the closing summary."""

import json
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from jaxdiff.errors import UserError

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/ddpm_mnist.py or configs/ddpm_mnist.py:smoke; "
      "override any entry with --config.section.key=value.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and samples.")
  flags.mark_flags_as_required(["config", "workdir"])


def fail(message: str):
  """Prints one line naming the problem and the fix, then exits 1."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _one_line(text: str) -> str:
  """The informative line of an error that absl or ml_collections formatted over many lines."""
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  for line in reversed(lines):
    if line.split(":")[0].endswith(("Error", "Exception")):
      return line.split(":", 1)[1].strip().rstrip(".")
  for line in lines:
    if "No such file" in line:
      return line
  return lines[0].rstrip(".") if lines else "unknown error"


def _override_of(argv, missing_key: str) -> str:
  for arg in argv:
    name = arg.split("=", 1)[0]
    if name.startswith("--config.") and missing_key in name.split(".")[1:]:
      return name[len("--config."):]
  return missing_key


def parse_flags(argv):
  """absl's parser, with bad flags and bad config overrides reported in one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except (KeyError, flags.Error, AttributeError, TypeError, ValueError, OSError) as e:
    # ml_collections reports an override of a key the config lacks as a KeyError, possibly re-raised as another
    # error, or as an unknown flag.
    unknown = getattr(e, "flagname", None) or ""
    key_error = e if isinstance(e, KeyError) else e.__context__
    if unknown.startswith("config.") or isinstance(key_error, KeyError) or "KeyError" in str(e):
      missing = str(key_error.args[0] if isinstance(key_error, KeyError) else _one_line(e)).strip("'\"")
      key = unknown[len("config."):] if unknown else _override_of(argv, missing)
      fail(f"unknown config key {key!r}: check the spelling against the config file (configs/default.py lists "
           "every key); a locked config takes no new keys.")
    fail(f"{_one_line(e)}. Run with --helpfull for the flags; config keys are in configs/default.py.")


def _configure_logging():
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax", "orbax", "tensorflow_datasets", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv, *, job: str):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}: flags take the form --name=value.")
  _configure_logging()
  from jaxdiff import xla_flags
  xla_flags.add_cpu_defaults()  # before JAX starts a backend
  # Imported here so --help and flag errors do not wait for JAX to load.
  from jaxdiff import likelihood, sampling
  from jaxdiff.train import loop
  from jaxdiff.train import mesh as mesh_lib
  jobs = {"train": loop.run, "sample": sampling.run, "likelihood": likelihood.run}

  config = FLAGS.config
  try:
    config.keys()
  except OSError as e:  # the config file is loaded lazily, on first access
    fail(f"cannot load the config file ({_one_line(e)}): pass --config=configs/<experiment>.py from the repo root.")
  workdir = FLAGS.workdir
  try:
    mesh_lib.initialize_distributed(config.distributed)
    summary = jobs[job](config, workdir)
  except UserError as e:
    fail(str(e))
  import jax
  if jax.process_index() != 0:  # process 0 reports for the whole run
    return
  print(f"\n{job} finished:")
  print(json.dumps(summary, indent=2, default=str))
  if job == "train" and summary["preempted"]:
    print(f"Preempted at step {summary['step']} and saved to {summary['checkpoints']}: rerun to resume.")
  elif job == "train":
    print(f"EMA sample grid: {summary['grid']}\ncheckpoints:     {summary['checkpoints']}\n"
          f"TensorBoard:     tensorboard --logdir {summary['tensorboard']}")
  elif job == "sample":
    print(f"sample grid: {summary['grid']}\nsamples:     {summary['npz']}")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"{job}_summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
