"""Every config key is checked before a job starts: each key with a bad value, through each job's CLI, ends in one
`error:` line naming the key, exit status 1, no traceback and no files."""

import glob
import importlib.util
import os

import pytest

from configs import default
from helpers import REPO
from jaxdiff import cli, config_schema
from jaxdiff.errors import ConfigError

KEYS = sorted(config_schema.schema())


def test_schema_lists_exactly_the_keys_of_the_default_config():
  assert sorted(config_schema.flatten(default.get_config())) == KEYS


def _experiment_configs():
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    if name not in ("default", "__init__"):
      for variant in (None, "smoke"):
        yield name, variant


@pytest.mark.parametrize("name,variant", list(_experiment_configs()))
def test_every_experiment_config_is_valid(name, variant):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if name == "stable_diffusion":  # built from a weights folder: tests/test_sd_pipeline.py
    return
  config = module.get_config(variant)
  if config.data.name == "image_folder" and not config.data.image_dir:  # so does a folder of images
    config.data.image_dir = REPO
  if config.job == "latent_diffusion":  # a latent model's frozen weights exist only where it runs
    if not (config.latent.autoencoder_workdir or config.autoencoder.init_from):
      config.latent.autoencoder_workdir = REPO
    for te in (config.text_encoder, config.text_encoder_2):
      if te.kind and not (te.trainable or te.init_from):
        te.init_from = REPO
      if not te.tokenizer and te.kind:
        te.tokenizer = REPO
  config_schema.validate(config)


def _cli(job, tmp_path, capsys, *args):
  """(exit status, stderr) of the job's CLI run in this process, as `python train.py ...` runs it."""
  argv = [job, "--config=configs/ddpm_mnist.py:smoke", f"--workdir={tmp_path / 'workdir'}",
          f"--config.data.data_dir={tmp_path / 'tfds'}", *(["--from=/nonexistent.pt"] if job == "convert" else []),
          *args]
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    with pytest.raises(SystemExit) as exit_info:
      cli.run_in_process(job, argv)
  finally:
    os.chdir(cwd)
  return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("job", cli.JOBS)
@pytest.mark.parametrize("key", KEYS)
def test_a_bad_value_of_any_key_stops_every_job_in_one_line(job, key, tmp_path, capsys):
  code, stderr = _cli(job, tmp_path, capsys, f"--config.{key}={config_schema.schema()[key].bad}")
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert code == 1 and len(errors) == 1, stderr
  assert key in errors[0] or key.rsplit(".", 1)[-1] in errors[0], errors[0]
  assert "Traceback" not in stderr
  assert not os.listdir(tmp_path)  # no workdir, no data_dir: nothing was written


@pytest.mark.parametrize("job,args,match", [
    ("train", ["--config.train.learning_rate=-1.0"], "train.learning_rate=-1.0 is not valid: use a number > 0"),
    ("sample", ["--config.sample.num_samples=0"], "sample.num_samples=0 is not valid: use an integer >= 1"),
    ("train", ["--config.distributed.coordinator_address=127.0.0.1:1234"], "needs distributed.num_processes"),
    ("sample", ["--config.data.name=image_folder"], "needs a folder of images"),
    ("train", ["--config.diffusion.var_type=learned_range"], "is trained by the VLB"),
    ("sample", ["--config.sample.timestep_respacing=ddim13"], "no integer stride gives exactly 13"),
    ("sample", [], "No checkpoint in"),
    ("train", ["--config.model.attention_resolutions=(5,)"], "is not a feature-map size"),
    ("sample", ["--config.sample.guidance_scale=3.0", "--config.model.class_conditional=False"],
     "sample.guidance_scale=3.0 needs a class-conditional model"),
    ("sample", ["--config.sample.guidance_scale=3.0"], "needs a model trained with a null class"),
    ("train", ["--config.train.cond_drop_prob=0.1", "--config.model.class_conditional=False"],
     "drops the class of a class-conditional model"),
    ("sample", ["--config.sample.classifier_scale=1.0"], "needs a classifier: set --config.sample.classifier_workdir"),
    ("sample", ["--config.sample.classifier_scale=1.0", "--config.sample.classifier_workdir=/tmp",
                "--config.sample.classifier_from=/tmp"], "set one of sample.classifier_workdir and"),
    ("sample", ["--config.job=classifier"], "trains a noisy classifier, and sample runs diffusion models"),
    ("train", ["--config.job=classifier", "--config.classifier.pool=attention",
               "--config.classifier.num_head_channels=-1"], "splits heads by channels"),
])
def test_cross_key_constraints(job, args, match, tmp_path, capsys):
  code, stderr = _cli(job, tmp_path, capsys, *args)
  # a conditional model counts the dataset's classes first: TFDS may print its preparation progress before the error
  assert code == 1 and stderr.count("error: ") == 1 and "Traceback" not in stderr and match in stderr, stderr
  assert not os.path.exists(tmp_path / "workdir")


def test_workdir_that_is_a_file(tmp_path, capsys):
  (tmp_path / "workdir").write_text("not a folder")
  code, stderr = _cli("train", tmp_path, capsys)
  assert code == 1 and stderr.startswith("error: --workdir=") and "is a file" in stderr and stderr.count("\n") == 1


def test_unknown_and_missing_keys():
  config = default.get_config()
  config.train.nope = 1
  with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
    config_schema.validate(config)
  config = default.get_config()
  del config.sample["eta"]
  with pytest.raises(ConfigError, match="lacks 'sample.eta'"):
    config_schema.validate(config)


@pytest.mark.parametrize("job,raises", [("train", True), ("sample", False), ("convert", False), ("likelihood", True)])
def test_batch_sizes_are_checked_only_for_the_jobs_that_use_them(job, raises, monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(jax, "device_count", lambda: 3)  # e.g. sampling ADM on 3 GPUs
  config = default.get_config()  # train.batch_size 128, likelihood.batch_size 64: not multiples of 3
  if raises:
    with pytest.raises(ConfigError, match=f"{job}.batch_size=.* must be a multiple of the 3 devices"):
      config_schema.validate_for_devices(config, job=job)
  else:
    config_schema.validate_for_devices(config, job=job)
