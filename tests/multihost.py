"""Runs a jaxdiff command as several JAX processes on 127.0.0.1, each with its own fake CPU devices.

Every job's multi-process test goes through here, so a new job gets the same treatment by calling `run`:

  outputs = multihost.run(["train.py", "--config=configs/ddpm_mnist.py:smoke", ...], num_processes=2, devices=1)

Each process runs under a hard `timeout` (a hang in a collective fails the test instead of blocking CI) and gets
the distributed flags of its job: `config_flags` for the absl CLIs (train.py, sample.py, the likelihood job and
the converter), `evaluation_flags` for `python -m jaxdiff.evaluation`.
"""

import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def config_flags(port: int, num_processes: int, process_id: int) -> list[str]:
  return [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          f"--config.distributed.num_processes={num_processes}", f"--config.distributed.process_id={process_id}"]


def evaluation_flags(port: int, num_processes: int, process_id: int) -> list[str]:
  return [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
          f"--process_id={process_id}"]


def device_env(devices: int, **extra) -> dict:
  """The environment of a process with `devices` fake CPU devices."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
              **extra)


def launch(args: list[str], *, num_processes: int, devices: int, flags=config_flags, timeout: int = TIMEOUT_S,
           env: dict | None = None) -> list[subprocess.Popen]:
  """Starts `python *args` as `num_processes` processes of one distributed run (process i gets flags(port, n, i)).

  With num_processes=1 no distributed flags are added: the single-process reference run.
  """
  port = free_port()
  processes = []
  for i in range(num_processes):
    distributed = flags(port, num_processes, i) if num_processes > 1 else []
    processes.append(subprocess.Popen(
        ["timeout", "-k", "10", str(timeout), sys.executable, *args, *distributed], cwd=REPO,
        env=env or device_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True))
  return processes


def wait(processes: list[subprocess.Popen], *, check: bool = True) -> list[str]:
  """The outputs of all processes; with check, fails unless every one exited 0."""
  outputs = [p.communicate()[0] for p in processes]
  if check:
    for i, (p, output) in enumerate(zip(processes, outputs)):
      assert p.returncode == 0, f"process {i} of {len(processes)} exited {p.returncode}:\n{output[-5000:]}"
  return outputs


def run(args: list[str], *, num_processes: int, devices: int, **kwargs) -> list[str]:
  """Runs a command to the end as `num_processes` processes and returns their outputs (all must exit 0)."""
  return wait(launch(args, num_processes=num_processes, devices=devices, **kwargs))


def kill(processes: list[subprocess.Popen], sig=signal.SIGKILL):
  """Sends `sig` to every process and its `timeout` wrapper."""
  for p in processes:
    try:
      os.killpg(p.pid, sig)
    except ProcessLookupError:
      pass
  for p in processes:
    p.communicate()


def wait_for(predicate, processes: list[subprocess.Popen], *, timeout: float = TIMEOUT_S, what: str = "condition"):
  """Polls `predicate()` until it holds; fails (and kills the run) if a process ends first or time runs out."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if any(p.poll() is not None for p in processes):
      outputs = wait(processes, check=False)
      raise AssertionError(f"a process ended before {what}:\n" + "\n---\n".join(o[-3000:] for o in outputs))
    time.sleep(0.05)
  kill(processes)
  raise AssertionError(f"timed out waiting for {what}")
