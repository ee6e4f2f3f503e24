"""CPU demo of the first stage: a KL and a VQ autoencoder trained by train.py on the bundled MNIST digits, judged on
the 500 digits they never saw (TFDS split train[4500:]).

  python benchmarks/autoencoder_demo.py --part kl --workdir runs/autoencoder_demo
  python benchmarks/autoencoder_demo.py --part vq --workdir runs/autoencoder_demo

Each part runs `python train.py --config=configs/autoencoder_{kl,vq}_mnist.py` (wall time measured around it),
then reconstructs the held-out digits from the EMA weights and prints:
- PSNR and SSIM of the reconstructions (jaxdiff.evaluation.reconstruction, checked against skimage);
- judge accuracy: how often benchmarks/mnist_quality.py's digit classifier (trained on real digits only) names the
  true digit, on the originals and on their reconstructions: reconstructions that stay readable as the same digit
  keep the originals' accuracy;
- rFD: the Frechet distance between the judge's features of the reconstructions and of the originals (the FID
  Inception weights cannot be downloaded here; `python -m jaxdiff.evaluation autoencoder --weights=...` gives the
  Inception rFID where they are), next to the same distance for the originals blurred by one pixel;
- the latent std and scale factor the job stored.
It writes docs/autoencoder_{kl,vq}.png (input | reconstruction pairs) and <workdir>/<part>_demo.json. `--smoke` runs
the `:smoke` configs for a few steps and writes the picture into the workdir (tests/test_benchmarks.py).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

import mnist_quality  # noqa: E402
from jaxdiff import data as data_lib  # noqa: E402
from jaxdiff import sampling  # noqa: E402
from jaxdiff.evaluation import metrics, reconstruction  # noqa: E402
from jaxdiff.train import autoencoder as autoencoder_train  # noqa: E402
from jaxdiff.train import experiment as experiment_lib  # noqa: E402
from jaxdiff.train import jobs  # noqa: E402

HELD_OUT = "train[4500:]"


def held_out_digits(config):
  """The 500 held-out digits once each (one epoch of the pipeline): float [-1, 1] images and labels."""
  d = config.data
  batches = data_lib.train_batches(name=d.name, image_size=d.image_size, channels=d.channels, batch_size=100, seed=0,
                                   data_dir=d.data_dir, split=HELD_OUT)
  first = [next(batches) for _ in range(5)]
  return np.concatenate([b["image"] for b in first]), np.concatenate([b["label"] for b in first])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=("kl", "vq"), required=True)
  parser.add_argument("--workdir", default="runs/autoencoder_demo")
  parser.add_argument("--skip_training", action="store_true", help="judge an existing run")
  parser.add_argument("--smoke", action="store_true", help="the :smoke configs, a few steps")
  parser.add_argument("--data_dir", help="TFDS data_dir (default ~/tensorflow_datasets)")
  args = parser.parse_args(argv)
  variant = "smoke" if args.smoke else None
  config_path = f"configs/autoencoder_{args.part}_mnist.py" + (":smoke" if args.smoke else "")
  workdir = os.path.abspath(os.path.join(args.workdir, args.part))
  data_flags = [f"--config.data.data_dir={args.data_dir}"] if args.data_dir else []
  seconds = None
  previous = os.path.join(workdir, f"{args.part}_demo.json")
  if args.skip_training and os.path.exists(previous):  # keep the measured training time
    with open(previous) as f:
      seconds = json.load(f)["train_seconds"]
  if not args.skip_training:
    start = time.time()
    subprocess.run([sys.executable, "train.py", f"--config={config_path}", f"--workdir={workdir}", *data_flags],
                   cwd=ROOT, check=True)
    seconds = time.time() - start

  from configs import autoencoder_kl_mnist, autoencoder_vq_mnist
  config = (autoencoder_kl_mnist if args.part == "kl" else autoencoder_vq_mnist).get_config(variant)
  config.data.data_dir = args.data_dir
  exp = experiment_lib.build(config)
  params, step = exp.restore_params(workdir, use_ema=True)
  images, labels = held_out_digits(config)

  @jax.jit
  def reconstruct(x):
    return jnp.clip(autoencoder_train.reconstruct(exp.model, params, x)[0], -1, 1)

  recon = np.concatenate([np.asarray(reconstruct(images[i:i + 100])) for i in range(0, len(images), 100)])
  psnr = np.asarray(reconstruction.psnr(images, recon))
  ssim = np.asarray(reconstruction.ssim(images, recon))
  originals, reconstructions = (np.asarray(sampling.to_uint8(v)) for v in (images, recon))
  judge_images, judge_labels = mnist_quality.real_digits()[:2]
  judge = mnist_quality.classifier(judge_images, judge_labels)
  # The judge trained on 4,000 of the 5,000 digits: some held-out digits are among them; count them and report
  # its accuracy on the rest too.
  seen = np.isin([d.tobytes() for d in np.asarray(sampling.to_uint8(images))], [d.tobytes() for d in judge_images])
  probs_real, feats_real = mnist_quality.outputs(judge, originals)
  probs_rec, feats_rec = mnist_quality.outputs(judge, reconstructions)
  _, feats_blur = mnist_quality.outputs(judge, mnist_quality.blur(originals))
  real_stats = metrics.Statistics.of(feats_real)
  with open(os.path.join(workdir, jobs.LATENT_SCALE_FILE)) as f:
    scale = json.load(f)
  result = {
      "part": args.part, "step": step, "train_seconds": seconds, "cpu": _cpu(), "held_out_digits": len(images),
      "psnr": float(psnr.mean()), "ssim": float(ssim.mean()),
      "judge_accuracy_originals": float((probs_real.argmax(1) == labels).mean()),
      "judge_accuracy_reconstructions": float((probs_rec.argmax(1) == labels).mean()),
      "same_prediction": float((probs_rec.argmax(1) == probs_real.argmax(1)).mean()),
      "judge_trained_on": int(seen.sum()),
      "judge_accuracy_unseen_originals": float((probs_real.argmax(1) == labels)[~seen].mean()),
      "judge_accuracy_unseen_reconstructions": float((probs_rec.argmax(1) == labels)[~seen].mean()),
      "rfd_judge": metrics.frechet_distance(metrics.Statistics.of(feats_rec), real_stats),
      "rfd_judge_blurred_originals": metrics.frechet_distance(metrics.Statistics.of(feats_blur), real_stats),
      "latent_std": scale["latent_std"], "scale_factor": scale["scale_factor"],
  }
  pairs = np.concatenate([originals[:32], reconstructions[:32]], axis=2)
  picture = os.path.join(workdir if args.smoke else os.path.join(ROOT, "docs"), f"autoencoder_{args.part}.png")
  sampling.save_grid(pairs, picture, scale=3)
  with open(os.path.join(workdir, f"{args.part}_demo.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown"


if __name__ == "__main__":
  main()
