"""The README's commands as written (with `:smoke`, local folders and fake devices), through the script that reads
them out of README.md: the quick start, your own data, evaluation, sampler grids and the three scale-out examples."""

import os
import subprocess
import sys

from helpers import REPO


def test_readme_commands_run_as_written(tfds_dir, tmp_path):
  result = subprocess.run([sys.executable, os.path.join("benchmarks", "readme_commands.py"), f"--out={tmp_path}",
                           f"--data_dir={tfds_dir}"], cwd=REPO, capture_output=True, text=True, timeout=2400)
  assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
  rows = [line for line in result.stdout.splitlines() if line.startswith("| `")]
  ran = [line for line in rows if "| ran (" in line]
  assert len(ran) >= 8, result.stdout  # quick start, own data, stats, fid, sampler grids, 3 scale-out examples
  for needle in ("train.py --config configs/ddpm_mnist.py --workdir runs/mnist", "jaxdiff.evaluation fid",
                 "gcloud compute tpus", "for i in 0 1", "adm_imagenet64.py --workdir /ckpt/adm64", "sampler_grids.py"):
    assert any(needle in line for line in ran), (needle, result.stdout)
