"""Small helpers shared by the tests."""

import hashlib
import os

import jax
import numpy as np

from configs import ddpm_mnist
from jaxdiff.train import experiment as experiment_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(tfds_dir, config_module=ddpm_mnist, **overrides):
  """`config_module`'s :smoke config on the session's data_dir, with {"section.key": value} overrides."""
  config = config_module.get_config("smoke")
  config.data.data_dir = tfds_dir
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def tree_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_digest(directory):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()


def restore_state(config, workdir, step=None):
  """The newest checkpoint of a workdir, or the given step."""
  exp = experiment_lib.build(config)
  checkpointer = exp.checkpointer(workdir)
  try:
    if step is None:
      return checkpointer.restore(exp.abstract_state_with_sharding())
    import orbax.checkpoint as ocp
    args = ocp.args.Composite(state=ocp.args.StandardRestore(exp.abstract_state_with_sharding()))
    return checkpointer.manager.restore(step, args=args)["state"]
  finally:
    checkpointer.close()


def parse_config(args):
  """The config a CLI builds from `--config=configs/...` and `--config.x.y=value` flags (paths from the repo)."""
  from absl import flags
  from ml_collections import config_flags
  holder = flags.FlagValues()
  argv = ["jaxdiff", *args]
  config_flags.DEFINE_config_file("config", None, flag_values=holder, sys_argv=argv)
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    holder(argv)
    return holder.config.copy_and_resolve_references()
  finally:
    os.chdir(cwd)


def run_cli(job, capsys, *args):
  """(exit status, stderr) of `python <job>.py <args>` run in this process from the repository (a failing job)."""
  import pytest
  from jaxdiff import cli
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    with pytest.raises(SystemExit) as exit_info:
      cli.run_in_process(job, [job, *args])
  finally:
    os.chdir(cwd)
  return exit_info.value.code, capsys.readouterr().err


def randomize_torch(module, seed=0):
  """Every weight of a PyTorch module random, norm scales, biases and codebooks too, at a scale that keeps
  activations O(1): the guided-diffusion fixtures' scheme (scripts/make_guided_diffusion_fixtures.py)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('fixtures_script',
                                                os.path.join(REPO, 'scripts', 'make_guided_diffusion_fixtures.py'))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  return script.randomize(module, seed)
