"""Every job as a user runs it on a pod: the CLIs as 2 and 4 JAX processes on 127.0.0.1 (1 or 2 fake devices each).

Each run is compared with one process on the same number of devices (bitwise: the same program on the same data)
or on another number (close: only the summation order of the gradient all-reduce differs).
"""

import json
import os
import re
import shutil
import signal

import numpy as np
import pytest
from PIL import Image

import multihost
from helpers import parse_config, restore_state, smoke_config, tree_equal
from jaxdiff.evaluation import inception

SMOKE = "--config=configs/ddpm_mnist.py:smoke"
NUM_SAMPLES = 48


def train_args(workdir, tfds_dir, num_steps):
  return ["train.py", SMOKE, f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}",
          f"--config.train.num_steps={num_steps}", "--config.train.checkpoint_every=2",
          "--config.train.sample_every=2", "--config.train.keep_checkpoints=5"]


def sample_args(workdir, tfds_dir):
  return ["sample.py", SMOKE, f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}",
          f"--config.sample.num_samples={NUM_SAMPLES}", "--config.sample.per_device_batch_size=2"]


def copy_checkpoints(workdir, to):
  shutil.copytree(workdir / "checkpoints", to / "checkpoints")
  return to


def grid(workdir, step):
  return np.asarray(Image.open(workdir / "samples" / f"train_grid_step{step:07d}.png"))


def summary_json(output):
  """The JSON summary a CLI prints after '<job> finished:'."""
  return json.loads(output.split(" finished:\n", 1)[1].split("\n}\n", 1)[0] + "\n}")


@pytest.fixture(scope="module")
def reference_run(tfds_dir, tmp_path_factory):
  """One process with two devices: steps 0-6, checkpoints and grids every 2 steps."""
  workdir = tmp_path_factory.mktemp("reference_run")
  multihost.run(train_args(workdir, tfds_dir, 6), num_processes=1, devices=2)
  return workdir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Two processes with one device each: steps 0-4, starting from an empty data_dir that both prepare at once."""
  workdir = tmp_path_factory.mktemp("two_process_run")
  fresh_data_dir = tmp_path_factory.mktemp("fresh_tfds")
  outputs = multihost.run(train_args(workdir, fresh_data_dir, 4), num_processes=2, devices=1)
  return workdir, fresh_data_dir, outputs


def test_two_processes_train_and_draw_grids_like_one(tfds_dir, reference_run, two_process_run):
  workdir, _, outputs = two_process_run
  assert "train finished:" in outputs[0] and "train finished:" not in outputs[1]  # process 0 reports
  config = smoke_config(tfds_dir, **{"train.num_steps": 4})
  two, one = restore_state(config, str(workdir)), restore_state(config, str(reference_run), step=4)
  assert int(two.step) == int(one.step) == 4
  assert tree_equal(two.params, one.params) and tree_equal(two.opt_state, one.opt_state)
  for step in (2, 4):
    np.testing.assert_array_equal(grid(workdir, step), grid(reference_run, step))


@pytest.mark.parametrize("num_processes,devices", [(1, 2), (4, 1)])
def test_resume_two_process_run_with_another_process_count(tfds_dir, reference_run, two_process_run, tmp_path,
                                                           num_processes, devices):
  workdir = copy_checkpoints(two_process_run[0], tmp_path)
  outputs = multihost.run(train_args(workdir, tfds_dir, 6), num_processes=num_processes, devices=devices)
  assert "Resumed at step 4 of 6" in outputs[0]
  config = smoke_config(tfds_dir, **{"train.num_steps": 6})
  resumed, reference = restore_state(config, str(workdir)), restore_state(config, str(reference_run))
  assert int(resumed.step) == int(reference.step) == 6
  if num_processes * devices == 2:  # the same devices as the reference run: the same program
    assert tree_equal(resumed.params, reference.params) and tree_equal(resumed.ema_params, reference.ema_params)
  else:
    for a, b in zip(jax_leaves(resumed.params), jax_leaves(reference.params)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  assert grid(workdir, 6).shape == grid(reference_run, 6).shape


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sigterm_to_one_process_saves_one_step_everywhere_and_exits_zero(tfds_dir, tmp_path):
  processes = multihost.launch(["train.py", SMOKE, f"--workdir={tmp_path}", f"--config.data.data_dir={tfds_dir}",
                                "--config.train.num_steps=100000", "--config.train.checkpoint_every=2"],
                               num_processes=2, devices=1)
  multihost.wait_for(lambda: (tmp_path / "checkpoints" / "2").is_dir(), processes, what="the step-2 checkpoint")
  processes[1].send_signal(signal.SIGTERM)  # `timeout` passes it on to the process
  outputs = multihost.wait(processes)
  stopped = [re.findall(r"Preempted \(SIGTERM\): saved step (\d+)", output) for output in outputs]
  assert all(len(s) == 1 for s in stopped) and stopped[0] == stopped[1], outputs[1][-3000:]
  step = int(stopped[0][0])
  assert 2 <= step < 100000 and (tmp_path / "checkpoints" / str(step)).is_dir()
  assert int(restore_state(smoke_config(tfds_dir), str(tmp_path)).step) == step


def samples(workdir):
  summary = json.load(open(workdir / "sample_summary.json"))
  with np.load(summary["npz"]) as f:
    return f["arr_0"], summary


@pytest.fixture(scope="module")
def one_device_samples(tfds_dir, reference_run, tmp_path_factory):
  workdir = copy_checkpoints(reference_run, tmp_path_factory.mktemp("one_device_samples"))
  multihost.run(sample_args(workdir, tfds_dir), num_processes=1, devices=1)
  return samples(workdir)[0]


@pytest.mark.parametrize("num_processes,devices", [(2, 2), (4, 1)])
def test_sampling_with_several_processes_is_bitwise_one_device(tfds_dir, reference_run, one_device_samples, tmp_path,
                                                               num_processes, devices):
  workdir = copy_checkpoints(reference_run, tmp_path)
  outputs = multihost.run(sample_args(workdir, tfds_dir), num_processes=num_processes, devices=devices)
  images, summary = samples(workdir)
  np.testing.assert_array_equal(images, one_device_samples)
  assert summary["sampled_now"] == NUM_SAMPLES and "sample finished:" not in outputs[1]
  job = os.path.dirname(summary["npz"])
  assert not [f for f in os.listdir(os.path.join(job, "shards")) if not f.startswith("shard_")]


def test_killed_sampling_job_resumes_with_another_process_count(tfds_dir, reference_run, one_device_samples,
                                                                tmp_path):
  workdir = copy_checkpoints(reference_run, tmp_path)
  args = [*sample_args(workdir, tfds_dir), "--config.sample.per_device_batch_size=1"]

  def shards():
    return list((workdir / "samples").glob("*/shards/shard_*.npz")) if (workdir / "samples").exists() else []

  processes = multihost.launch(args, num_processes=2, devices=1)
  multihost.wait_for(lambda: len(shards()) >= 2, processes, what="two shards")
  multihost.kill(processes)
  written = len(shards())
  assert 2 <= written < NUM_SAMPLES // 2, written  # killed mid-job (2 images a shard)

  outputs = multihost.run(args, num_processes=1, devices=1)
  images, summary = samples(workdir)
  assert summary["sampled_now"] == NUM_SAMPLES - 2 * written
  np.testing.assert_array_equal(images, one_device_samples)  # exactly N, and the same images
  indices = np.concatenate([np.load(path)["indices"] for path in shards()])
  assert sorted(indices) == list(range(NUM_SAMPLES)), outputs[0][-2000:]  # no duplicates, none missing


def likelihood_args(workdir, tfds_dir):
  return ["-m", "jaxdiff.likelihood", SMOKE, f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}",
          "--config.likelihood.batch_size=8", "--config.likelihood.num_batches=2"]


@pytest.fixture(scope="module")
def one_process_likelihood(tfds_dir, reference_run):
  return summary_json(multihost.run(likelihood_args(reference_run, tfds_dir), num_processes=1, devices=2)[0])


@pytest.mark.parametrize("num_processes,devices", [(2, 1), (4, 1)])
def test_likelihood_with_several_processes(tfds_dir, reference_run, one_process_likelihood, num_processes, devices):
  outputs = multihost.run(likelihood_args(reference_run, tfds_dir), num_processes=num_processes, devices=devices)
  summary = summary_json(outputs[0])
  assert summary["num_images"] == one_process_likelihood["num_images"] == 16
  for key in ("bits_per_dim", "prior_bits_per_dim"):
    np.testing.assert_allclose(summary[key], one_process_likelihood[key], rtol=1e-5)


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("inception")
  np.savez(folder / "weights.npz", **inception.random_state_dict(0))
  np.savez(folder / "samples.npz", np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
  return folder


def evaluation_stats(folder, out, num_processes, devices):
  outputs = multihost.run(["-m", "jaxdiff.evaluation", "stats", f"--samples={folder / 'samples.npz'}",
                           f"--out={out}", f"--weights={folder / 'weights.npz'}", "--batch_size=4",
                           "--resize_to=75"], num_processes=num_processes, devices=devices,
                          flags=multihost.evaluation_flags)
  with np.load(out) as f:
    return f["mu"], outputs


@pytest.fixture(scope="module")
def one_process_stats(inception_files):
  return evaluation_stats(inception_files, inception_files / "one.npz", 1, 1)[0]


@pytest.mark.parametrize("num_processes,devices", [(2, 1), (4, 1)])
def test_evaluation_with_several_processes(inception_files, one_process_stats, tmp_path, num_processes, devices):
  mu, outputs = evaluation_stats(inception_files, tmp_path / "stats.npz", num_processes, devices)
  assert '"num_images": 10' in outputs[0] and "num_images" not in outputs[1]  # process 0 reports and writes
  np.testing.assert_allclose(mu, one_process_stats, rtol=1e-5, atol=1e-6)


def test_converter_with_two_processes(tmp_path):
  from test_convert import WEIGHTS
  from test_convert_cli import guided_config_args
  config = parse_config(guided_config_args())
  states = []
  for num_processes in (1, 2):
    workdir = tmp_path / str(num_processes)
    outputs = multihost.run(["-m", "jaxdiff.convert", f"--from={WEIGHTS}", f"--workdir={workdir}",
                             *guided_config_args()], num_processes=num_processes, devices=1)
    wrote = f"Wrote {workdir / 'checkpoints'}/0"
    assert wrote in outputs[0] and wrote not in "".join(outputs[1:])  # process 0 reports
    states.append(restore_state(config, str(workdir)))
  assert int(states[1].step) == 0 and tree_equal(states[0].params, states[1].params)
