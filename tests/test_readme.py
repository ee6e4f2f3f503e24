"""The README's commands as written: the scale-out examples run (with `:smoke`) through the script that reads them
out of README.md."""

import os
import subprocess
import sys

from helpers import REPO


def test_scale_out_examples_run_as_written(tfds_dir, tmp_path):
  result = subprocess.run([sys.executable, os.path.join("benchmarks", "readme_scale_examples.py"),
                           f"--out={tmp_path}", f"--data_dir={tfds_dir}"], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
  assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
  rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "example" not in line]
  assert len(rows) == 3 and all(line.endswith("| 4 |") for line in rows), result.stdout
