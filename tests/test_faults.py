"""Fault tolerance: damaged checkpoints, NaN losses, failed saves, SIGTERM and SIGKILL."""

import errno
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdiff.errors import CheckpointError
from jaxdiff.train import loop
from helpers import REPO, restore_state, smoke_config, tree_digest, tree_equal


def _truncate_largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def _remove_metadata(step_dir):
  for root, _, files in os.walk(step_dir):
    for name in files:
      if "metadata" in name.lower():
        os.remove(os.path.join(root, name))


def _empty_folder(step_dir):
  for entry in os.listdir(step_dir):
    path = os.path.join(step_dir, entry)
    subprocess.run(["rm", "-rf", path], check=True)


def _garbage_files(step_dir):
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")


@pytest.fixture(scope="module")
def two_checkpoints(tfds_dir, tmp_path_factory):
  """A run with checkpoints at steps 2 and 4 (copied per test)."""
  workdir = tmp_path_factory.mktemp("two_checkpoints")
  loop.run(smoke_config(tfds_dir, **{"train.num_steps": 4, "train.checkpoint_every": 2}), str(workdir))
  return workdir


@pytest.mark.parametrize("damage", [_truncate_largest_file, _remove_metadata, _empty_folder, _garbage_files])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tfds_dir, two_checkpoints, tmp_path, damage, caplog):
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(two_checkpoints), str(workdir)], check=True)
  config = smoke_config(tfds_dir, **{"train.num_steps": 4, "train.checkpoint_every": 2})
  damage(str(workdir / "checkpoints" / "4"))
  state = restore_state(config, str(workdir))
  assert int(state.step) == 2
  assert "step 4" in caplog.text and "unreadable" in caplog.text
  aside = os.listdir(str(workdir / "checkpoints") + "_unreadable")
  assert len(aside) == 1 and aside[0].startswith("4-")  # moved aside, not deleted
  # The resumed run redoes steps 3-4 and ends where an undamaged run ends.
  summary = loop.run(config, str(workdir))
  assert summary["resumed_from"] == 2 and summary["step"] == 4
  reference = restore_state(config, str(two_checkpoints))
  assert tree_equal(restore_state(config, str(workdir)).params, reference.params)


def test_nan_loss_stops_at_its_step_and_keeps_the_checkpoint(tfds_dir, tmp_path, monkeypatch):
  original = loop.batches

  def poisoned(exp, start_step):
    for step, batch in enumerate(original(exp, start_step), start=start_step + 1):
      if step == 3:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  monkeypatch.setattr(loop, "batches", poisoned)
  config = smoke_config(tfds_dir, **{"train.num_steps": 6, "train.checkpoint_every": 2})
  with pytest.raises(loop.TrainingDiverged, match=r"became nan at step 3; the last checkpoint \(step 2\)"):
    loop.run(config, str(tmp_path))
  state = restore_state(config, str(tmp_path))
  assert int(state.step) == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_failed_save_is_loud_and_keeps_the_previous_checkpoint(tfds_dir, tmp_path, monkeypatch):
  config = smoke_config(tfds_dir, **{"train.num_steps": 2, "train.checkpoint_every": 2})
  loop.run(config, str(tmp_path))
  before = tree_digest(tmp_path / "checkpoints")
  import orbax.checkpoint as ocp

  def disk_full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
  config.train.num_steps = 4
  expected = r"step 4 .* failed \(OSError.*No space left.*earlier checkpoint \(step 2\)"
  with pytest.raises(CheckpointError, match=expected):
    loop.run(config, str(tmp_path))
  assert tree_digest(tmp_path / "checkpoints") == before


def _train_process(workdir, tfds_dir, *overrides):
  return subprocess.Popen(
      [sys.executable, "train.py", "--config=configs/ddpm_mnist.py:smoke", f"--workdir={workdir}",
       f"--config.data.data_dir={tfds_dir}", *overrides],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step_folder(workdir, process, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [d for d in os.listdir(workdir / "checkpoints")] if (workdir / "checkpoints").exists() else []
    if any(d.isdigit() for d in steps):
      return
    if process.poll() is not None:
      raise AssertionError(process.stdout.read())
    time.sleep(0.2)
  process.kill()
  raise AssertionError("no checkpoint appeared")


def test_sigterm_saves_and_exits_zero_then_resumes(tfds_dir, tmp_path):
  workdir = tmp_path / "run"
  overrides = ["--config.train.num_steps=100000", "--config.train.checkpoint_every=3"]
  process = _train_process(workdir, tfds_dir, *overrides)
  _wait_for_step_folder(workdir, process)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output[-3000:]
  assert "Preempted at step" in output
  stopped_at = int(output.split("Preempted at step ")[1].split()[0])
  config = smoke_config(tfds_dir, **{"train.num_steps": stopped_at + 2})
  assert int(restore_state(config, str(workdir)).step) == stopped_at
  summary = loop.run(config, str(workdir))
  assert summary["resumed_from"] == stopped_at and summary["step"] == stopped_at + 2


def test_sigkill_at_any_step_then_resume_is_bitwise_identical(tfds_dir, tmp_path):
  overrides = ["--config.train.num_steps=12", "--config.train.checkpoint_every=1"]
  straight = _train_process(tmp_path / "straight", tfds_dir, *overrides)
  killed = _train_process(tmp_path / "killed", tfds_dir, *overrides)
  _wait_for_step_folder(tmp_path / "killed", killed)
  time.sleep(0.3)  # somewhere mid-run, possibly mid-save
  killed.send_signal(signal.SIGKILL)
  killed.communicate(timeout=60)
  assert straight.wait(timeout=300) == 0
  restarted = _train_process(tmp_path / "killed", tfds_dir, *overrides)
  output, _ = restarted.communicate(timeout=300)
  assert restarted.returncode == 0, output[-3000:]
  config = smoke_config(tfds_dir, **{"train.num_steps": 12})
  a, b = restore_state(config, str(tmp_path / "straight")), restore_state(config, str(tmp_path / "killed"))
  assert int(a.step) == int(b.step) == 12
  assert tree_equal(a.params, b.params) and tree_equal(a.ema_params, b.ema_params)
  assert tree_equal(a.opt_state, b.opt_state)


def test_nonfinite_steps_can_be_skipped(tfds_dir, tmp_path, monkeypatch):
  original = loop.batches

  def poisoned(exp, start_step):
    for step, batch in enumerate(original(exp, start_step), start=start_step + 1):
      yield dict(batch, image=np.full_like(batch["image"], np.inf)) if step == 3 else batch

  monkeypatch.setattr(loop, "batches", poisoned)
  config = smoke_config(tfds_dir, **{"train.num_steps": 5, "train.skip_nonfinite_steps": True})
  summary = loop.run(config, str(tmp_path))
  assert summary["step"] == 5 and np.isfinite(summary["final_loss"])
  state = restore_state(config, str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  assert int(state.opt_state.total_notfinite) == 1
