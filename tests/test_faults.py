"""Fault tolerance: damaged checkpoints, NaN losses, failed saves, SIGTERM and SIGKILL."""

import errno
import os
import re
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


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), MemoryError("out of memory")])
def test_restore_failure_without_damage_moves_nothing(tfds_dir, two_checkpoints, tmp_path, monkeypatch, error):
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(two_checkpoints), str(workdir)], check=True)
  before = tree_digest(workdir / "checkpoints")
  import orbax.checkpoint as ocp
  restore = ocp.CheckpointManager.restore

  def failing(self, step, args=None, **kwargs):
    if args is not None and "state" in args.keys():  # a transient failure while reading the train state
      raise error
    return restore(self, step, args=args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", failing)
  config = smoke_config(tfds_dir, **{"train.num_steps": 6, "train.checkpoint_every": 2})
  with pytest.raises(CheckpointError, match=r"Could not restore checkpoint step 4 .*intact; nothing was moved"):
    loop.run(config, str(workdir))
  assert tree_digest(workdir / "checkpoints") == before
  assert not os.path.exists(str(workdir / "checkpoints") + "_unreadable")


def test_no_restart_from_step_zero_when_every_checkpoint_is_damaged(tfds_dir, two_checkpoints, tmp_path):
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(two_checkpoints), str(workdir)], check=True)
  for step in ("2", "4"):
    _truncate_largest_file(str(workdir / "checkpoints" / step))
  config = smoke_config(tfds_dir, **{"train.num_steps": 6, "train.checkpoint_every": 2})
  for _ in range(2):  # the rerun, with both steps already set aside, refuses too
    with pytest.raises(CheckpointError, match=r"No readable checkpoint is left .* move .*_unreadable away"):
      loop.run(config, str(workdir))
  assert sorted(d.split("-")[0] for d in os.listdir(str(workdir / "checkpoints") + "_unreadable")) == ["2", "4"]


def test_truncation_that_orbax_reads_silently_is_caught_by_the_file_sizes(tfds_dir, two_checkpoints, tmp_path):
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(two_checkpoints), str(workdir)], check=True)
  data = [os.path.join(r, f) for r, _, fs in os.walk(workdir / "checkpoints" / "4" / "state") for f in fs
          if os.sep + "d" + os.sep in os.path.join(r, f)]
  smallest = min(data, key=os.path.getsize)
  os.truncate(smallest, os.path.getsize(smallest) // 2)
  config = smoke_config(tfds_dir, **{"train.num_steps": 4, "train.checkpoint_every": 2})
  assert int(restore_state(config, str(workdir)).step) == 2


def _can_mount_tmpfs(directory) -> bool:
  result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {directory}"],
                          capture_output=True)
  return result.returncode == 0


def test_async_save_to_a_full_disk_names_the_failed_and_the_intact_step(tfds_dir, two_checkpoints, tmp_path):
  """A real disk that fills during orbax's background write: a tmpfs in a private mount namespace."""
  workdir = tmp_path / "small_disk"
  workdir.mkdir()
  if not _can_mount_tmpfs(workdir):
    pytest.skip("needs `unshare -rm` and tmpfs mounts (user and mount namespaces) to make a small disk")
  def kib(step):  # tmpfs stores whole pages; later steps compress less than step 2
    return sum(-(-os.path.getsize(os.path.join(r, f)) // 4096) * 4
               for r, _, fs in os.walk(two_checkpoints / "checkpoints" / str(step)) for f in fs)
  size_kib = kib(2) + int(1.5 * kib(4))  # room for steps 2 and 4, not 6
  check = ("import sys; sys.path[:0] = ['tests', '.']; from helpers import restore_state, smoke_config; "
           f"print('restored step', int(restore_state(smoke_config('{tfds_dir}'), '{workdir}').step))")
  script = (f"mount -t tmpfs -o size={size_kib}k tmpfs {workdir} && "
            f"{sys.executable} train.py --config=configs/ddpm_mnist.py:smoke --workdir={workdir} "
            f"--config.data.data_dir={tfds_dir} --config.train.num_steps=8 --config.train.checkpoint_every=2; "
            f"echo exit status $?; ls {workdir}/checkpoints; {sys.executable} -c \"{check}\"")
  result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  # orbax's background threads may print tracebacks into the middle of our line, so find it anywhere
  errors = re.findall(r"error: Saving checkpoint.*", result.stderr)
  assert len(errors) == 1, result.stderr[-3000:]
  assert re.search(r"Saving checkpoint step 6 .* failed .*No space left.* newest intact checkpoint is step 4",
                   errors[0]), errors[0]
  assert "exit status 1" in result.stdout and "restored step 4" in result.stdout, result.stdout + result.stderr[-2000:]


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
  num_steps = 16
  overrides = [f"--config.train.num_steps={num_steps}", "--config.train.checkpoint_every=1"]
  straight = _train_process(tmp_path / "straight", tfds_dir, *overrides)
  killed = _train_process(tmp_path / "killed", tfds_dir, *overrides)
  _wait_for_step_folder(tmp_path / "killed", killed)
  time.sleep(0.3)  # somewhere mid-run, possibly mid-save
  killed.send_signal(signal.SIGKILL)
  killed.communicate(timeout=60)
  steps = [int(d) for d in os.listdir(tmp_path / "killed" / "checkpoints") if d.isdigit()]
  assert max(steps) < num_steps, steps  # the kill interrupted the run
  assert straight.wait(timeout=300) == 0
  restarted = _train_process(tmp_path / "killed", tfds_dir, *overrides)
  output, _ = restarted.communicate(timeout=300)
  assert restarted.returncode == 0, output[-3000:]
  resumed_from = int(re.search(rf"Resumed at step (\d+) of {num_steps}", output).group(1))
  assert 1 <= resumed_from < num_steps
  config = smoke_config(tfds_dir, **{"train.num_steps": num_steps})
  a, b = restore_state(config, str(tmp_path / "straight")), restore_state(config, str(tmp_path / "killed"))
  assert int(a.step) == int(b.step) == num_steps
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
