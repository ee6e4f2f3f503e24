"""Small helpers shared by the tests."""

import hashlib
import os

import jax
import numpy as np

from configs import ddpm_mnist
from jaxdiff.train import experiment as experiment_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(tfds_dir, **overrides):
  config = ddpm_mnist.get_config("smoke")
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


def restore_state(config, workdir):
  exp = experiment_lib.build(config)
  checkpointer = exp.checkpointer(workdir)
  try:
    return checkpointer.restore(exp.abstract_state_with_sharding())
  finally:
    checkpointer.close()
