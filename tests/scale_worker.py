"""Runs a few training steps under a given device layout and writes the resulting params; used by test_scale.py.

  python tests/scale_worker.py OUT.npz --devices 4 --data -1 --fsdp 2
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--data", type=int, default=-1)
  parser.add_argument("--fsdp", type=int, default=1)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--tfds-dir", required=True)
  args = parser.parse_args()

  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  import numpy as np
  from configs import ddpm_mnist
  from jaxdiff.train import experiment, loop

  config = ddpm_mnist.get_config("smoke")
  config.data.data_dir = args.tfds_dir
  config.mesh.data, config.mesh.fsdp = args.data, args.fsdp
  config.model.base_channels = 32  # wide enough for fsdp to split real leaves
  config.model.norm_groups = 8

  exp = experiment.build(config)
  state = exp.init_state(jax.random.fold_in(jax.random.key(config.seed), 0))
  step_fn = loop.make_train_step(exp)
  batches = loop.batches(exp, 0)
  for _ in range(args.steps):
    state, metrics = step_fn(state, exp.shard_batch(next(batches)))
    jax.block_until_ready(metrics)  # one step in flight at a time, as the training loop does
  assert step_fn._cache_size() == 1, f"the train step compiled {step_fn._cache_size()} times"
  sharded = [leaf for leaf in jax.tree.leaves(state.params) if not leaf.sharding.is_fully_replicated]
  leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]
  np.savez(args.out, *leaves, num_sharded=len(sharded), loss=float(metrics["loss"]))


if __name__ == "__main__":
  main()
