"""Sharded and multi-process training and sampling match a single device (CPU, fake devices and local processes)."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, smoke_config
from jaxdiff import sampling
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


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(tfds_dir, tmp_path, single_device):
  port = str(_free_port())
  out = tmp_path / "params.npz"
  processes = [_worker(out, tfds_dir, "--devices", "1", "--process-id", str(i), "--num-processes", "2",
                       "--port", port) for i in range(2)]
  for process in processes:
    _finish(process)
  _assert_close(_params(out)[0], single_device[0])


@pytest.fixture(scope="module")
def trained(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  config = smoke_config(tfds_dir, **{"train.num_steps": 2, "sample.num_samples": 10, "sample.batch_size": 4})
  loop.run(config, str(workdir))
  return config, workdir


def _samples(path):
  with np.load(path) as f:
    return f["arr_0"]


def test_samples_do_not_depend_on_batch_size(trained):
  config, workdir = trained
  reference = _samples(sampling.run(config, str(workdir))["npz"])
  assert reference.shape[0] == 10
  config = config.copy_and_resolve_references()
  config.sample.batch_size = 2
  config.sample.seed = config.sample.seed  # same job: shards are reused only when the settings match
  other_dir = workdir / "batch2"
  os.makedirs(other_dir / "checkpoints", exist_ok=True)
  subprocess.run(["cp", "-r", str(workdir / "checkpoints"), str(other_dir)], check=True)
  again = _samples(sampling.run(config, str(other_dir))["npz"])
  assert np.abs(again.astype(int) - reference.astype(int)).max() <= 1


def test_killed_sampling_job_resumes_without_duplicates(trained, tmp_path):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.sample.num_samples = 40
  reference = _samples(sampling.run(config, str(workdir))["npz"])  # uninterrupted: one device, batch 4

  job = tmp_path / "job"
  os.makedirs(job)
  subprocess.run(["cp", "-r", str(workdir / "checkpoints"), str(job)], check=True)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  args = [*TIMEOUT, sys.executable, "sample.py", "--config=configs/ddpm_mnist.py:smoke", f"--workdir={job}",
          f"--config.data.data_dir={config.data.data_dir}", "--config.sample.num_samples=40",
          "--config.sample.batch_size=2"]
  process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
  shard_dir = job / "samples" / sampling.job_name(config, 2) / "shards"
  while not (shard_dir.exists() and len(os.listdir(shard_dir)) >= 2) and process.poll() is None:
    time.sleep(0.01)
  os.killpg(process.pid, signal.SIGKILL)  # the job and its `timeout` wrapper
  process.communicate()
  finished = [f for f in os.listdir(shard_dir) if ".tmp" not in f]
  assert 2 <= len(finished) < 20, finished  # killed mid-job

  rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  result = _samples(next((job / "samples" / sampling.job_name(config, 2)).glob("samples_*.npz")))
  assert result.shape == reference.shape  # exactly N
  assert np.abs(result.astype(int) - reference.astype(int)).max() <= 1
  shard_indices = np.concatenate([np.load(shard_dir / f)["indices"] for f in os.listdir(shard_dir)
                                  if ".tmp" not in f])
  assert sorted(shard_indices) == list(range(40))  # no duplicates, none missing


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
