"""Which XLA:CPU flags make jaxdiff's CPU jobs fastest on this CPU: the main job's train step and sampler per flag set.

  python benchmarks/xla_cpu_flags.py [--config configs/ddpm_mnist.py] [--reps 20]

Each flag set runs in a fresh process (XLA reads XLA_FLAGS once), on the config's network with synthetic data:
the median train step at the config's batch (params, Adam and EMA, donated state) and the median of a 25-step
ancestral sampler at batch 64. Prints the CPU (model and the ISA extensions that matter to XLA and oneDNN) and one
row per flag set; jaxdiff/xla_flags.py's defaults come from such tables.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_pytorch import cpu_description  # noqa: E402  pylint: disable=wrong-import-position
YNN_OFF_FOR_CONV = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
FLAG_SETS = {
    "XLA defaults": "",
    "jaxdiff default (no YNNPACK convolutions)": YNN_OFF_FOR_CONV,
    "+ oneDNN convolutions": f"{YNN_OFF_FOR_CONV} --xla_cpu_experimental_onednn_fusion_type=individual_convolution",
    "+ oneDNN convolutions and dots": (f"{YNN_OFF_FOR_CONV} "
                                      "--xla_cpu_experimental_onednn_fusion_type=individual_convolution,individual_dot"),
    "+ oneDNN runtime (use_onednn)": f"{YNN_OFF_FOR_CONV} --xla_cpu_use_onednn=true",
    "+ 512-bit vectors": f"{YNN_OFF_FOR_CONV} --xla_cpu_prefer_vector_width=512",
    "+ legacy runtime": f"{YNN_OFF_FOR_CONV} --xla_cpu_use_thunk_runtime=false",
}


def worker(config_path: str, reps: int):
  """Runs inside the subprocess: prints one JSON line of timings."""
  sys.path.insert(0, REPO)
  import jax
  import numpy as np
  from ml_collections import config_flags  # noqa: F401  (the config module imports configs.default)
  import importlib.util
  from jaxdiff import sampling
  from jaxdiff.train import experiment, loop
  spec = importlib.util.spec_from_file_location("exp_config", os.path.join(REPO, config_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.sample.timestep_respacing = "25"
  config.sample.per_device_batch_size = 64
  exp = experiment.build(config, job="train")
  rng = np.random.default_rng(0)
  batch = exp.shard_batch({"image": rng.uniform(-1, 1, (config.train.batch_size, *exp.sample_shape))
                           .astype(np.float32), "label": np.zeros(config.train.batch_size, np.int32)})
  state = exp.init_state(jax.random.key(0))
  step = loop.make_train_step(exp)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  sample_fn = sampling.make_sample_fn(exp, clip_denoised=True)
  indices = np.arange(64)
  jax.block_until_ready(sample_fn(state.ema_params, 0, indices))
  sample_times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(sample_fn(state.ema_params, 0, indices))
    sample_times.append(time.perf_counter() - start)
  print(json.dumps(dict(step_s=float(np.median(times)), compile_s=compile_s,
                        sample_s=float(np.median(sample_times)))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/ddpm_mnist.py")
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args.config, args.reps)
  print(f"{cpu_description()}; {args.config}; medians of {args.reps} train steps and 3 samplers", flush=True)
  print("| flags | train step ms | steps/s | sampler 25 steps x 64 s | first step (compile) s |")
  print("|---|---|---|---|---|")
  for name, flags in FLAG_SETS.items():
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, __file__, "--worker", f"--config={args.config}", f"--reps={args.reps}"],
                            env=env, capture_output=True, text=True, cwd=REPO)
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    if result.returncode or not lines:
      reason = (result.stderr.strip().splitlines() or ["failed"])[-1][:100]
      print(f"| {name} | failed: {reason} | | | |", flush=True)
      continue
    r = json.loads(lines[-1])
    print(f"| {name} | {r['step_s'] * 1e3:.1f} | {1 / r['step_s']:.2f} | {r['sample_s']:.2f} | {r['compile_s']:.1f} |",
          flush=True)


if __name__ == "__main__":
  main()
