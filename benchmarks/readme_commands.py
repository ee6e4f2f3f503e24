"""Runs the README's commands as written, with the `:smoke` configs, on this CPU: the README cannot drift from what
works.

  python benchmarks/readme_commands.py [--out /tmp/readme_commands] [--data_dir DIR]

Every `python ...` command of README.md (code blocks, and commands quoted in the text) runs in README order, in one
shell each, from the repository. What is changed, and only that: each config gets `:smoke`; workdirs (`runs/...`,
`/ckpt/...`, `/mnt/shared/...`), data_dirs and the coordinator port become local ones; `pip install ... &&` is
dropped (this environment is installed); the FID Inception weights are a random state dict
(`JAXDIFF_INCEPTION_WEIGHTS`) read at 75x75 (`--resize_to=75`); a host's GPUs or TPU chips become fake CPU devices.
The single-host example runs on 8 devices; the TPU-pod command (the part after `--command=`) runs on 2 "hosts" that
JAX discovers by itself through the environment a SLURM job step gives (`distributed.auto=True` detects SLURM as it
detects a pod). Commands that need the internet or released weights are listed as skipped, with the test that covers
their code. Prints a table; exits 1 if a command fails.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900
SKIPPED = {  # a substring of the command: why it does not run here, and what covers its code
    "python -m pytest": "the test suite itself (CI runs it)",
    "tfds build": "needs the internet (downloads CIFAR-10)",
    "64x64_diffusion.pt": "needs guided-diffusion's released weights (tests/test_convert_cli.py converts fixtures)",
    "ddpm-cifar10-32": "needs a diffusers model folder (tests/test_convert_cli.py converts a random one)",
    "compare_pytorch.py": "a benchmark of minutes (tests/test_benchmarks.py runs it at a tiny size)",
    "--config ... --workdir ...": "a template, not a command",
    "--workdir runs/adm64": "samples the converted released weights of the skipped command above",
    "readme_commands.py": "this script",
    "_classifier.pt": "needs guided-diffusion's released classifiers (tests/test_convert_cli.py samples ADM-G from "
                      "fixture files)",
    "guidance_demo.py": "a demo of half an hour (tests/test_benchmarks.py runs it with --smoke)",
    "autoencoder_demo.py": "a demo of 20 minutes (tests/test_benchmarks.py runs it with --smoke)",
    "autoencoder_ldm.py:": "needs released VAE weights or LPIPS files (tests/test_autoencoder.py imports random "
                           "diffusers and SD-layout files; tests/test_autoencoder_jobs.py trains with LPIPS)",
    "vae_memory.py": "a benchmark of minutes at 1024x1024 (its numbers are in the README)",
    "stable_diffusion.py:": "needs a Stable Diffusion folder (tests/test_sd_pipeline.py and "
                            "tests/test_sdxl_pipeline.py sample random SD and SDXL ones through this config)",
    "ldm_demo.py": "a demo of 15 minutes (tests/test_benchmarks.py runs it with --smoke)",
    "ldm_mnist.py": "needs an autoencoder run (tests/test_latent_diffusion.py trains and samples :smoke on one)",
    "sd_unet_compile.py": "a benchmark of minutes (its numbers are in benchmarks/RESULTS.md)",
    "sdxl_memory.py": "a benchmark of half an hour (its numbers are in benchmarks/RESULTS.md; tests/test_sdxl_unet.py "
                      "runs it on a tiny config)",
    "sdxl_demo.py": "a demo of 15 minutes (tests/test_sdxl_demo.py runs it with --smoke)",
    "sdxl_mnist.py": "needs an autoencoder run (benchmarks/sdxl_demo.py trains one and this model)",
}


def readme_commands(readme: str) -> list[str]:
  """Every `python`, `for` or `gcloud` command, code blocks first within each section, continuation lines joined."""
  commands = []
  for section in re.split(r"\n## ", readme):
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    for block in blocks:
      joined = re.sub(r"\\\n\s*", "", block)
      commands += [line.strip() for line in joined.splitlines() if line.strip()]
    text = re.sub(r"```.*?```", "", section, flags=re.S)
    # inline mentions count when they are whole commands (with flags), wherever the text wraps them
    inline = [re.sub(r"\s+", " ", c) for c in re.findall(r"`(python [^`]+)`", text)]
    commands += [c for c in inline if " --" in c]
  return [c for c in commands if re.match(r"(pip install .*&& )?(python|for |gcloud)", c)]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def localise(command: str, out: str, data_dir: str) -> str:
  """`:smoke` configs, local folders and a free coordinator port; no pip install."""
  command = re.sub(r"^pip install [^&]*&& ", "", command)
  command = re.sub(r"(--config[= ])(configs/\w+\.py)(?=[\s\"]|$)", r"\1\2:smoke", command)
  command = re.sub(r"--config\.data\.data_dir=\S+?(?=[\s\"]|$)", f"--config.data.data_dir={data_dir}", command)
  command = re.sub(r"(?<=[\s=])(runs/|/ckpt/|/mnt/shared/)", lambda m: f"{out}/{m.group(1).strip('/')}/", command)
  command = command.replace("/path/to/images", os.path.join(out, "images"))
  if "jaxdiff.evaluation" in command:
    command += " --resize_to=75"
  return re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{free_port()}", command)


def slurm_env(process_id: int, num_processes: int) -> dict:
  """What a SLURM job step gives each task: JAX's auto-detection reads it as it reads a TPU pod's metadata."""
  while True:  # JAX derives the coordinator port from the job id: pick one whose port is free
    job_id = int.from_bytes(os.urandom(2), "little")
    try:
      with socket.socket() as s:
        s.bind(("127.0.0.1", job_id % 2 ** 12 + 65535 - 2 ** 12 + 1))
      break
    except OSError:
      continue
  return dict(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(num_processes),
              SLURM_PROCID=str(process_id), SLURM_LOCALID=str(process_id), SLURM_STEP_NUM_NODES=str(num_processes))


def shells(command: str, out: str, data_dir: str) -> tuple[list[tuple[str, dict]], str, str]:
  """The shells that run one README command, the folder they start in, and what they emulate."""
  one_device = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  if command.startswith("gcloud"):
    hosts = os.path.join(out, "pod_hosts")  # each host runs "cd jaxdiff && ..." from the folder of its checkout
    os.makedirs(hosts, exist_ok=True)
    if not os.path.exists(os.path.join(hosts, "jaxdiff")):
      os.symlink(REPO, os.path.join(hosts, "jaxdiff"))
    inner = localise(re.search(r'--command="(.*)"', command).group(1), out, data_dir)
    first = slurm_env(0, 2)
    envs = [dict(first, **one_device), dict(first, SLURM_PROCID="1", SLURM_LOCALID="1", **one_device)]
    return [(inner, env) for env in envs], hosts, "2 hosts (SLURM environment), 1 device each"
  local = localise(command, out, data_dir)
  if command.startswith("for "):
    return [(local, one_device)], REPO, "processes as written, 1 device each"
  if "--config.mesh.fsdp=8" in command:
    return [(local, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})], REPO, "8 devices"
  return [(local, {})], REPO, "1 device"


def prepare(out: str) -> dict:
  """The image folder the README's own-data example reads, and random FID Inception weights."""
  folder = os.path.join(out, "images")
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(24):
    Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
  sys.path.insert(0, REPO)
  from jaxdiff.evaluation import inception
  weights = os.path.join(out, "inception_random.npz")
  np.savez(weights, **inception.random_state_dict(0))
  return {"JAXDIFF_INCEPTION_WEIGHTS": weights}


def run_all(out: str, data_dir: str) -> list[dict]:
  with open(os.path.join(REPO, "README.md")) as f:
    commands = readme_commands(f.read())
  env = dict(os.environ, JAX_PLATFORMS="cpu", TFDS_DATA_DIR=data_dir, **prepare(out))
  rows = []
  for command in commands:
    reason = next((why for key, why in SKIPPED.items() if key in command), None)
    if reason:
      rows.append(dict(command=command, result=f"skipped: {reason}", seconds=0.0))
      continue
    runs, cwd, layout = shells(command, out, data_dir)
    start = time.time()
    processes = [subprocess.Popen(["timeout", "-k", "10", str(TIMEOUT_S), "bash", "-c", f"set -o pipefail; {shell}"],
                                  cwd=cwd, env=dict(env, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for shell, extra in runs]
    outputs = [p.communicate()[0] for p in processes]
    seconds = time.time() - start
    failed = [i for i, p in enumerate(processes) if p.returncode]
    # `for ...; do ... & done; wait` exits 0 whatever its processes did: their summaries must say they finished.
    if command.startswith("for ") and not failed:
      workdir = re.search(r"--workdir[= ](\S+)", runs[0][0]).group(1)
      failed = [] if os.path.exists(os.path.join(workdir, "train_summary.json")) else [0]
    rows.append(dict(command=command, result=f"ran ({layout})" if not failed else "FAILED", seconds=seconds,
                     output="\n---\n".join(outputs[i][-3000:] for i in failed)))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=None, help="folder for the runs (default: a new temporary folder)")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir for the bundled digits (default: under --out)")
  args = parser.parse_args()
  out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="readme_commands_"))
  rows = run_all(out, os.path.abspath(args.data_dir or os.path.join(out, "tfds")))
  print("| README command | result | wall s |\n|---|---|---|")
  for row in rows:
    command = row["command"] if len(row["command"]) < 110 else row["command"][:107] + "..."
    print(f"| `{command}` | {row['result']} | {row['seconds']:.0f} |")
  for row in rows:
    if row["result"] == "FAILED":
      print(f"\nFAILED: {row['command']}\n{row['output']}")
  return 1 if any(row["result"] == "FAILED" for row in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
