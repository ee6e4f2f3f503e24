"""Sharded training steps match a single device (fake CPU devices); gradient accumulation and bf16 compute.

The multi-process jobs are tested through their CLIs in test_multiprocess.py.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, smoke_config
from jaxdiff.train import loop

WORKER = os.path.join(REPO, "tests", "scale_worker.py")
# A hang in a collective must fail the test, not block CI: every process runs under a hard timeout.
TIMEOUT = ["timeout", "-k", "10", "240"]


def _worker(out, tfds_dir, *args, env=None):
  return subprocess.Popen([*TIMEOUT, sys.executable, WORKER, str(out), "--tfds-dir", tfds_dir, *args],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(process):
  output, _ = process.communicate()
  assert process.returncode == 0, output[-4000:]


def _params(path):
  with np.load(path) as f:
    return [f[f"arr_{i}"] for i in range(len([k for k in f.files if k.startswith("arr_")]))], int(f["num_sharded"])


def _assert_close(a, b, learning_rate=2e-3):
  # Adam divides each gradient element by its own scale: where a gradient is ~0, another summation order across
  # devices moves that element's update by a small fraction of the learning rate, so atol is tied to it.
  for x, y in zip(a, b, strict=True):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-2 * learning_rate)


@pytest.fixture(scope="module")
def single_device(tfds_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("single") / "params.npz"
  _finish(_worker(out, tfds_dir, "--devices", "1"))
  return _params(out)


@pytest.mark.parametrize("data,fsdp", [(4, 1), (2, 2), (1, 4)])
def test_sharded_step_matches_single_device(tfds_dir, tmp_path, single_device, data, fsdp):
  out = tmp_path / "params.npz"
  _finish(_worker(out, tfds_dir, "--devices", "4", "--data", str(data), "--fsdp", str(fsdp)))
  params, num_sharded = _params(out)
  assert (num_sharded > 0) == (fsdp > 1)  # fsdp really splits parameters
  _assert_close(params, single_device[0])


def _one_step(config, batch_size=8):
  import jax
  from jaxdiff.train import experiment
  exp = experiment.build(config)
  state = exp.init_state(jax.random.key(0))
  batch = exp.shard_batch(next(loop.batches(exp, 0)))
  return loop.make_train_step(exp)(state, batch)


def test_gradient_accumulation_matches_the_full_batch(tfds_dir):
  import jax
  full_state, full_metrics = _one_step(smoke_config(tfds_dir))
  accum_state, accum_metrics = _one_step(smoke_config(tfds_dir, **{"train.grad_accum_steps": 4}))
  np.testing.assert_allclose(accum_metrics["loss"], full_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(accum_metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(accum_state.params), jax.tree.leaves(full_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_compute_keeps_fp32_master_params(tfds_dir):
  import jax
  import jax.numpy as jnp
  fp32_state, fp32_metrics = _one_step(smoke_config(tfds_dir))
  state, metrics = _one_step(smoke_config(tfds_dir, **{"model.dtype": "bfloat16"}))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((state.params, state.ema_params)))
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(metrics["loss"])
  np.testing.assert_allclose(metrics["loss"], fp32_metrics["loss"], rtol=2e-2)
