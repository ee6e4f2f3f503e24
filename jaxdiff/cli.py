"""What the absl CLIs share (train.py, sample.py, `python -m jaxdiff.likelihood`, `python -m jaxdiff.convert`,
`python -m jaxdiff.evaluation autoencoder`): flags, config loading and checking, one-line errors and the closing
summary.

The CLI layer sits above the jobs: it imports them when it runs one, and no job imports it. Each entry point is

  cli.define_flags(job=...); app.run(functools.partial(cli.main, job=...), flags_parser=cli.parse_flags)

and `run_in_process(job, argv)` runs the same path on fresh flags (for tests).
"""

import json
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from jaxdiff.errors import UserError

FLAGS = flags.FLAGS


JOBS = ("train", "sample", "likelihood", "convert", "evaluate")


def define_flags(*, job: str, flag_values: flags.FlagValues = FLAGS, argv: list[str] | None = None):
  """--config (with --config.x.y overrides, read from argv or sys.argv) and --workdir; --from for the converter."""
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/ddpm_mnist.py or configs/ddpm_mnist.py:smoke; "
      "override any entry with --config.section.key=value.", lock_config=True, flag_values=flag_values,
      sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and samples.",
                      flag_values=flag_values)
  required = ["config", "workdir"]
  if job == "convert":
    flags.DEFINE_string("from", None, "A guided-/improved-diffusion .pt/.safetensors file or a diffusers model folder.",
                        flag_values=flag_values)
    required.append("from")
  if job == "evaluate":
    flags.DEFINE_string("weights", None, "FID Inception weights for rFID (as `python -m jaxdiff.evaluation fid "
                        "--weights`); without them rFID is left out.", flag_values=flag_values)
    flags.DEFINE_integer("resize_to", 299, "side images are resized to for rFID's Inception; only the default gives "
                         "comparable scores", flag_values=flag_values)
  flags.mark_flags_as_required(required, flag_values=flag_values)


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


def parse_flags(argv, flag_values: flags.FlagValues = FLAGS):
  """absl's parser, with bad flags and bad config overrides reported in one line instead of a traceback."""
  try:
    return flag_values(argv)
  except (KeyError, flags.Error, AttributeError, TypeError, ValueError, OSError) as e:
    # ml_collections reports an override of a key the config lacks as a KeyError, possibly re-raised as another
    # error, or as an unknown flag.
    unknown = getattr(e, "flagname", None) or ""
    key_error = e if isinstance(e, KeyError) else e.__context__
    if unknown.startswith("config.") or isinstance(key_error, KeyError) or "KeyError" in str(e):
      missing = str(key_error.args[0] if isinstance(key_error, KeyError) else _one_line(e)).strip("'\"")
      key = unknown[len("config."):] if unknown else _override_of(argv, missing)
      fail(f"unknown config key {key!r}: check the spelling against the config file (jaxdiff/defaults.py lists "
           "every key); a locked config takes no new keys.")
    fail(f"{_one_line(e)}. Run with --helpfull for the flags; config keys are in jaxdiff/defaults.py.")


def _configure_logging():
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax", "orbax", "tensorflow_datasets", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def _job_function(job: str, flag_values: flags.FlagValues):
  """The job's `run(config, workdir) -> summary`, imported only now so --help and flag errors stay fast."""
  if job == "train":
    from jaxdiff.train import loop
    return loop.run
  if job == "sample":
    from jaxdiff import sampling
    return sampling.run
  if job == "likelihood":
    from jaxdiff import likelihood
    return likelihood.run
  if job == "evaluate":
    from jaxdiff.evaluation import autoencoder
    return lambda config, workdir: autoencoder.run(config, workdir, inception_weights=flag_values["weights"].value,
                                                   resize_to=flag_values["resize_to"].value)
  from jaxdiff import convert
  return lambda config, workdir: {"checkpoints": convert.write_checkpoint(flag_values["from"].value, config, workdir)}


def _report(job: str, summary: dict, workdir: str):
  if job == "convert":
    print(f"Wrote {summary['checkpoints']}/0: sample with python sample.py --config=<the same config> "
          f"--workdir={workdir}")
    return
  print(f"\n{job} finished:")
  print(json.dumps(summary, indent=2, default=str))
  if job == "train" and summary["preempted"]:
    print(f"Preempted at step {summary['step']} and saved to {summary['checkpoints']}: rerun to resume.")
  elif job == "train":
    if summary.get("job") == "autoencoder":
      e, scale = summary["evaluation"], summary["latent_scale"]
      print(f"held-out PSNR {e['psnr']:.2f} dB, SSIM {e['ssim']:.4f}; inputs | reconstructions: {summary['grid']}")
      print(f"latent std {scale['latent_std']:.4f}, scale factor {scale['scale_factor']:.5f} in "
            f"{summary['latent_scale_file']}")
    elif summary.get("evaluation"):
      e = summary["evaluation"]
      print(f"held-out accuracy: {e['accuracy']:.3f} (quarters of t, low to high noise: "
            f"{', '.join(format(e[f'accuracy_q{q}'], '.3f') for q in range(4))}) in {summary['evaluation_file']}")
    elif summary.get("grid"):
      print(f"EMA sample grid: {summary['grid']}")
    print(f"checkpoints:     {summary['checkpoints']}\nTensorBoard:     tensorboard --logdir {summary['tensorboard']}")
  elif job == "sample":
    if "grid" in summary:
      print(f"sample grid: {summary['grid']}\nsamples:     {summary['npz']}")
    else:  # sample.denoising_end < 1: the latents a refiner continues from
      print(f"latents:     {summary['npz']} (continue with --config.sample.init_images=<this file>)")
  elif job == "evaluate":
    print(f"reconstruction of {summary['examples']} images of {summary['split']}: PSNR {summary['psnr']:.2f} dB, "
          f"SSIM {summary['ssim']:.4f}, LPIPS {summary['lpips']}, rFID {summary['rfid']} ({summary['file']})")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"{job}_summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)


def main(argv, *, job: str, flag_values: flags.FlagValues = FLAGS):
  """Checks the config, joins a multi-process run if the config describes one, runs the job and reports."""
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}: flags take the form --name=value.")
  _configure_logging()
  from jaxdiff import xla_flags
  xla_flags.add_cpu_defaults()  # before JAX starts a backend
  from jaxdiff import config_schema
  from jaxdiff.train import mesh as mesh_lib

  try:
    config = flag_values.config
    config.keys()
  except OSError as e:  # the config file is loaded lazily, on first access
    fail(f"cannot load the config file ({_one_line(e)}): pass --config=configs/<experiment>.py from the repo root.")
  workdir = flag_values.workdir
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    fail(f"--workdir={workdir} is a file: pass a folder (it is created if missing).")
  try:
    config_schema.validate(config, job=job)  # before anything starts or is written
    run = _job_function(job, flag_values)
    mesh_lib.initialize_distributed(config.distributed)
    summary = run(config, workdir)
  except UserError as e:
    fail(str(e))
  import jax
  if jax.process_index() == 0:  # process 0 reports for the whole run
    _report(job, summary, workdir)


def run_in_process(job: str, argv: list[str]):
  """Runs a job's CLI in this process, on fresh flags (argv[0] is the program name)."""
  flag_values = flags.FlagValues()
  define_flags(job=job, flag_values=flag_values, argv=argv)
  argv = parse_flags(argv, flag_values)
  main(argv, job=job, flag_values=flag_values)
