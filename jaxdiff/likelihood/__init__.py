"""Bits/dim of data under a trained model's full variational bound (all T terms plus the prior).

  python -m jaxdiff.likelihood --config configs/iddpm_cifar10.py --workdir runs/iddpm

Restores the newest checkpoint of the workdir, evaluates `likelihood.num_batches` batches of `likelihood.split`, and
prints and writes `<workdir>/likelihood_summary.json`. Costs T network evaluations per batch.
"""

import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdiff import data as data_lib
from jaxdiff import weights
from jaxdiff.models import conditioning
from jaxdiff.train import experiment as experiment_lib
from jaxdiff.train import mesh as mesh_lib


def make_bpd_fn(exp: experiment_lib.Experiment, *, clip_denoised: bool, seed: int):
  """(params, batch, batch index) -> per-example total and prior bits/dim, batch sharded over the mesh."""
  diffusion = mesh_lib.host_to_mesh(exp.diffusion, NamedSharding(exp.mesh, P()), process_local=False)

  def bpd(diffusion, params, batch, index):
    cond = conditioning.class_condition(batch["label"]) if exp.num_classes else None

    def denoise(x, t):
      return exp.model.apply({"params": params}, x, t, cond, train=False)
    key = jax.random.fold_in(jax.random.key(seed), index)
    out = diffusion.bits_per_dim(denoise, batch["image"], key, clip_denoised=clip_denoised)
    return out["total"], out["prior"]

  jitted = jax.jit(bpd, out_shardings=(exp.batch_sharding, exp.batch_sharding))
  return lambda params, batch, index: jitted(diffusion, params, batch, index)


def run(config, workdir: str) -> dict:
  """Bits/dim of the newest checkpoint in `workdir` on `config.likelihood.num_batches` batches."""
  exp = experiment_lib.build(config, job="likelihood")
  lk, d = config.likelihood, config.data
  params, step = weights.load(exp, workdir, use_ema=lk.use_ema)
  data = data_lib.train_batches(name=d.name, data_dir=d.data_dir, image_dir=d.image_dir, split=lk.split,
                                image_size=d.image_size, channels=d.channels,
                                batch_size=lk.batch_size // jax.process_count(), seed=lk.seed, random_flip=False,
                                process_index=jax.process_index(), process_count=jax.process_count())
  bpd_fn = make_bpd_fn(exp, clip_denoised=lk.clip_denoised, seed=lk.seed)
  totals, priors = [], []
  start_time = time.time()
  for b in range(lk.num_batches):
    total, prior = bpd_fn(params, exp.shard_batch(next(data)), b)
    totals.append(np.asarray(multihost_utils.process_allgather(total, tiled=True)))
    priors.append(np.asarray(multihost_utils.process_allgather(prior, tiled=True)))
  totals, priors = np.concatenate(totals), np.concatenate(priors)
  summary = {"step": step, "bits_per_dim": float(totals.mean()),
             "bits_per_dim_stderr": float(totals.std() / np.sqrt(len(totals))), "prior_bits_per_dim":
             float(priors.mean()), "num_images": len(totals), "split": lk.split, "ema": lk.use_ema,
             "seconds": time.time() - start_time}
  return summary
