"""Reconstruction quality of an autoencoder on a split: PSNR, SSIM, LPIPS and rFID.

  python -m jaxdiff.evaluation autoencoder --config=configs/autoencoder_kl_mnist.py --workdir=runs/ae_kl_mnist

The weights are the workdir's newest checkpoint (EMA unless sample.use_ema=False) or, when autoencoder.init_from is
set, PyTorch weights (a diffusers folder, an LDM/SD checkpoint). The images are `autoencoder.eval_batches` batches of
train.batch_size from `autoencoder.eval_split` (or data.split), reconstructed from the posterior's mode. LPIPS needs
autoencoder_loss.lpips_vgg/lpips_heads and rFID the FID Inception weights (--weights, as `fid`); without them those
entries are null and say why.
"""

import json
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdiff import sampling
from jaxdiff.errors import CheckpointError
from jaxdiff.evaluation import features as features_lib
from jaxdiff.evaluation import inception, metrics
from jaxdiff.models import lpips
from jaxdiff.progress import progress_bar
from jaxdiff.train import autoencoder as autoencoder_train
from jaxdiff.train import experiment as experiment_lib
from jaxdiff.train import jobs
from jaxdiff.train import mesh as mesh_lib


def load_params(exp: experiment_lib.Experiment, workdir: str):
  """(params on the mesh, where they came from) of the autoencoder `exp` describes."""
  a = exp.config.autoencoder
  if a.init_from:
    params = autoencoder_train.imported_params(exp.config, exp.abstract_state().params)
    return mesh_lib.host_to_mesh(params, NamedSharding(exp.mesh, P()), process_local=False), {"source": a.init_from}
  params, step = exp.restore_params(workdir, use_ema=exp.config.sample.use_ema, weights_only=True)
  return params, {"source": os.path.abspath(workdir), "step": step, "ema": exp.config.sample.use_ema}


def run(config, workdir: str, *, inception_weights: str | None = None,
        resize_to: int = inception.INPUT_SIZE) -> dict:
  exp = experiment_lib.build(config, job="evaluate")
  a, al = config.autoencoder, config.autoencoder_loss
  params, source = load_params(exp, workdir)
  replicated = NamedSharding(exp.mesh, P())
  perceptual = None
  if al.lpips_vgg and al.lpips_heads:
    perceptual = mesh_lib.host_to_mesh(lpips.load_lpips_params(al.lpips_vgg, al.lpips_heads), replicated,
                                       process_local=False)
  extractor = None
  try:
    extractor = features_lib.FeatureExtractor(inception.load_variables(inception_weights),
                                              batch_size=config.train.batch_size, resize_to=resize_to)
  except CheckpointError as e:
    if inception_weights:  # asked for by name: a missing or bad file is an error, not a silent gap
      raise
    no_inception = str(e)

  def outputs(params, perceptual_params, batch):
    out = autoencoder_train.quality(exp.model, params, batch["image"])
    if perceptual_params is not None:
      out["lpips"] = lpips.LPIPS().apply({"params": perceptual_params}, out["input"], out["reconstruction"])
    return {**out, "input": sampling.to_uint8(out["input"]),
            "reconstruction": sampling.to_uint8(out["reconstruction"])}

  outputs = jax.jit(outputs, out_shardings=replicated)
  data = jobs.input_batches(exp, 0, split=a.eval_split or None, augment=False)
  values = {"psnr": [], "ssim": [], "lpips": []}
  pools = {"input": [], "reconstruction": []}
  with progress_bar(total=a.eval_batches, desc="reconstructing", unit="batch",
                    disable=jax.process_index() != 0) as bar:
    for _ in range(a.eval_batches):
      out = jax.device_get(outputs(params, perceptual, exp.shard_batch(next(data))))
      for name in values:
        if name in out:
          values[name].append(out[name])
      if extractor is not None:
        for name in pools:
          pools[name].append(extractor.of_array(out[name], desc=name)["pool"])
      bar.update(1)
  psnr = np.concatenate(values["psnr"])
  summary = {
      "split": a.eval_split or config.data.split, "examples": int(len(psnr)), **source,
      **autoencoder_train.mean_psnr(psnr),
      "ssim": float(np.concatenate(values["ssim"]).mean()),
      "lpips": float(np.concatenate(values["lpips"]).mean()) if values["lpips"] else None,
      "rfid": None,
  }
  if not values["lpips"]:
    summary["lpips_missing"] = "set autoencoder_loss.lpips_vgg and lpips_heads to local weight files"
  if extractor is None:
    summary["rfid_missing"] = no_inception
  else:
    statistics = [metrics.Statistics.of(np.concatenate(pools[name])) for name in pools]
    summary["rfid"] = metrics.frechet_distance(*statistics)
  path = os.path.join(workdir, "evaluation", f"reconstruction_{_file_part(summary['split'])}.json")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(summary, f, indent=2)
  summary["file"] = path
  return summary


def _file_part(split: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in split).strip("_")
