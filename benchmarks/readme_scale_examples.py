"""Runs the three examples of the README's "Scaling out" section as written, with the `:smoke` configs, on CPU.

  python benchmarks/readme_scale_examples.py [--out /tmp/readme_examples] [--data_dir ~/tensorflow_datasets]

The commands are read out of README.md, so the README cannot drift from what works. What is changed, and only that:
each config gets `:smoke`; the data_dir, workdirs and the coordinator port become local ones; a host's GPUs or TPU
chips become fake CPU devices. The single-host example runs on 8 devices; the TPU-pod command (the part after
`--command=`) runs on 2 "hosts" that JAX discovers by itself, through the environment a SLURM job step would give
(`distributed.auto=True` detects SLURM as it detects a pod); the explicit-processes loop runs as written. Each
example must end with a train summary at its final step and a sample grid. Prints a table.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900


def readme_examples(readme: str) -> list[str]:
  """The bash blocks of the "Scaling out" section, continuation lines joined."""
  section = readme.split("\n## Scaling out\n", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
  return [" ".join(line.strip().rstrip("\\").strip() for line in block.strip().splitlines()) for block in blocks]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def localise(command: str, *, data_dir: str, workdir: str) -> str:
  """`:smoke` configs, a local data_dir and workdir, a free coordinator port."""
  command = re.sub(r"(--config[= ])(configs/\w+\.py)\b", r"\1\2:smoke", command)
  command = re.sub(r"--config\.data\.data_dir=\S+?(?=[\s\"]|$)", f"--config.data.data_dir={data_dir}", command)
  command = re.sub(r"(--workdir[= ])\S+?(?=[\s\"]|$)", rf"\g<1>{workdir}", command)
  return re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{free_port()}", command)


def slurm_env(process_id: int, num_processes: int) -> dict:
  """What a SLURM job step gives each task: JAX's auto-detection reads it as it reads a TPU pod's metadata."""
  while True:  # JAX derives the coordinator port from the job id: pick one whose port is free
    job_id = int.from_bytes(os.urandom(2), "little")
    port = job_id % 2 ** 12 + 65535 - 2 ** 12 + 1
    try:
      with socket.socket() as s:
        s.bind(("127.0.0.1", port))
      break
    except OSError:
      continue
  return dict(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(num_processes),
              SLURM_PROCID=str(process_id), SLURM_LOCALID=str(process_id), SLURM_STEP_NUM_NODES=str(num_processes))


def run_shells(commands: list[tuple[str, dict]], cwd: str) -> tuple[list[int], list[str]]:
  processes = [subprocess.Popen(["timeout", "-k", "10", str(TIMEOUT_S), "bash", "-c", command], cwd=cwd,
                                env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for command, env in commands]
  outputs = [p.communicate()[0] for p in processes]
  return [p.returncode for p in processes], outputs


def check(workdir: str) -> dict:
  """The summary of a finished smoke run, with its final grid."""
  path = os.path.join(workdir, "train_summary.json")
  if not os.path.exists(path):
    raise AssertionError(f"no {path}: the run did not finish")
  with open(path) as f:
    summary = json.load(f)
  if summary["steps_run"] < 1 or not summary["grid"] or not os.path.exists(summary["grid"]):
    raise AssertionError(f"{path} shows no training or no grid: {summary}")
  return summary


def run_all(out: str, data_dir: str) -> list[dict]:
  with open(os.path.join(REPO, "README.md")) as f:
    single_host, pod, explicit = readme_examples(f.read())
  rows = []

  def example(name, commands, cwd, workdir, processes, devices):
    start = time.time()
    codes, outputs = run_shells(commands, cwd)
    seconds = time.time() - start
    if any(codes):
      raise AssertionError(f"{name}: exit statuses {codes}\n" + "\n---\n".join(o[-4000:] for o in outputs))
    summary = check(workdir)
    rows.append(dict(example=name, processes=processes, devices=devices, seconds=seconds, step=summary["step"],
                     command=commands[0][0]))

  devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  workdir = os.path.join(out, "single_host")
  example("one host, several GPUs", [(localise(single_host, data_dir=data_dir, workdir=workdir), devices)], REPO,
          workdir, 1, 8)

  # The pod command as each host runs it: "cd jaxdiff && python train.py ...", from a folder holding the checkout.
  hosts = os.path.join(out, "pod_hosts")
  os.makedirs(hosts, exist_ok=True)
  if not os.path.exists(os.path.join(hosts, "jaxdiff")):
    os.symlink(REPO, os.path.join(hosts, "jaxdiff"))
  workdir = os.path.join(out, "pod")
  command = localise(re.search(r'--command="(.*)"', pod).group(1), data_dir=data_dir, workdir=workdir)
  env = [dict(slurm_env(0, 2), XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")]
  env.append(dict(env[0], SLURM_PROCID="1", SLURM_LOCALID="1"))
  example("TPU pod (2 hosts found by distributed.auto)", [(command, e) for e in env], hosts, workdir, 2, 2)

  workdir = os.path.join(out, "explicit")
  example("explicit processes", [(localise(explicit, data_dir=data_dir, workdir=workdir),
                                   {"XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                                    "JAX_PLATFORMS": "cpu"})], REPO, workdir, 2, 2)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=None, help="folder for the runs (default: a new temporary folder)")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir for the bundled digits (default: under --out)")
  args = parser.parse_args()
  out = args.out or tempfile.mkdtemp(prefix="readme_examples_")
  rows = run_all(out, args.data_dir or os.path.join(out, "tfds"))
  print("| example | processes | devices | wall s | final step |\n|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['example']} | {row['processes']} | {row['devices']} | {row['seconds']:.0f} | {row['step']} |")
  return rows


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
