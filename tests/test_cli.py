"""The CLIs as a user runs them: bad input ends in one line on stderr, exit status 1, no traceback."""

import os
import subprocess
import sys

import pytest

from helpers import REPO


def run_cli(script, *args):
  return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,match", [
    (["--config.train.nope=1"], "unknown config key 'train.nope'"),
    (["--config.nope.x=1"], "unknown config key 'nope.x'"),
    (["--config.train.batch_size=abc"], "--config.train.batch_size=abc"),
    (["--config.diffusion.schedule=cosin"], "diffusion.schedule='cosin' is not valid: use one of 'linear', 'cosine'"),
    (["--config.data.name=image_folder", "--config.data.image_dir=/nonexistent"], "/nonexistent"),
])
def test_bad_input_is_one_line(tfds_dir, tmp_path, args, match):
  result = run_cli("train.py", "--config=configs/ddpm_mnist.py:smoke", f"--workdir={tmp_path}",
                   f"--config.data.data_dir={tfds_dir}", *args)
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr
  error_lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(error_lines) == 1 and match in error_lines[0], result.stderr


@pytest.mark.parametrize("config,match", [
    ("configs/nonexistent.py", "No such file"),
    ("configs/ddpm_mnist.py:tiny", "Unknown variant 'tiny'"),
])
def test_bad_config_file(tmp_path, config, match):
  result = run_cli("sample.py", f"--config={config}", f"--workdir={tmp_path}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert match in result.stderr


def test_sample_cli_end_to_end(tfds_dir, tmp_path):
  common = ["--config=configs/ddpm_mnist.py:smoke", f"--workdir={tmp_path}", f"--config.data.data_dir={tfds_dir}",
            "--config.train.num_steps=1"]
  train = run_cli("train.py", *common)
  assert train.returncode == 0, train.stderr[-2000:]
  assert "EMA sample grid:" in train.stdout and "checkpoints:" in train.stdout
  sample = run_cli("sample.py", *common)
  assert sample.returncode == 0, sample.stderr[-2000:]
  assert ".npz" in sample.stdout and os.path.exists(tmp_path / "sample_summary.json")
