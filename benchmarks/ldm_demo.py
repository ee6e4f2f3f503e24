"""Text-to-image latent diffusion on the bundled MNIST digits, end to end through train.py and sample.py, judged by
a digit classifier that never touches the model (benchmarks/mnist_quality.py: a CNN trained on 4,000 real digits).

  python benchmarks/ldm_demo.py --workdir runs/ldm_demo

1. configs/autoencoder_kl_mnist.py: the KL autoencoder (28x28 digits -> 7x7x4 latents), --ae-steps steps.
2. configs/ldm_mnist.py: the UNet with spatial transformers on those latents, cross-attending to a 2-layer CLIP text
   transformer trained jointly on captions made from the labels ("a handwritten seven").
3. sample.py with the ten captions as prompts (sample i asks for digit i mod 10), classifier-free guidance at
   --guidance-scale, DDIM over 50 steps, decoded by the autoencoder.
Prints a table: how often the judge sees the digit the prompt asks for, how often it is confident, the Frechet
distance in the judge's features to held-out real digits, the wall time of every phase; writes
<workdir>/ldm_grid.png (a row per prompt).
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import guidance_demo  # noqa: E402
import mnist_quality  # noqa: E402
from configs import ldm_mnist  # noqa: E402


def run(script, config, workdir, *overrides):
  start = time.time()
  subprocess.run([sys.executable, os.path.join(ROOT, script), f"--config={config}", f"--workdir={workdir}",
                  *overrides], check=True, cwd=ROOT)
  return time.time() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num-samples", type=int, default=1000)
  parser.add_argument("--ae-steps", type=int, default=1000)
  parser.add_argument("--guidance-scale", type=float, default=3.0)
  parser.add_argument("--smoke", action="store_true", help="tiny configs and few samples (for the tests)")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir of the bundled digits (default ~/tensorflow_datasets)")
  args = parser.parse_args(argv)
  data = [f"--config.data.data_dir={args.data_dir}"] if args.data_dir else []
  variant = ":smoke" if args.smoke else ""
  ae_dir, ldm_dir = os.path.join(args.workdir, "autoencoder"), os.path.join(args.workdir, "ldm")
  times = {}
  ae_overrides = [] if args.smoke else [f"--config.train.num_steps={args.ae_steps}",
                                        f"--config.train.disc_start={int(args.ae_steps * 0.7)}",
                                        "--config.train.sample_every=0"]
  times["train autoencoder"] = run("train.py", f"configs/autoencoder_kl_mnist.py{variant}", ae_dir, *ae_overrides,
                                   *data)
  latent = [f"--config.latent.autoencoder_workdir={ae_dir}", *data]
  times["train latent diffusion"] = run("train.py", f"configs/ldm_mnist.py{variant}", ldm_dir, *latent)
  prompts = os.path.join(args.workdir, "prompts.txt")
  with open(prompts, "w") as f:
    f.write("".join(f"a handwritten {digit}\n" for digit in ldm_mnist.DIGITS))
  times["sample"] = run("sample.py", f"configs/ldm_mnist.py{variant}", ldm_dir, *latent,
                        f"--config.sample.prompt_file={prompts}", f"--config.sample.num_samples={args.num_samples}",
                        f"--config.sample.per_device_batch_size={min(args.num_samples, 250)}",
                        f"--config.sample.guidance_scale={args.guidance_scale}")
  done = sorted(os.path.join(root, f) for root, _, files in os.walk(os.path.join(ldm_dir, "samples"))
                for f in files if f.startswith(f"samples_{args.num_samples}x"))
  path = max(done, key=os.path.getmtime)
  row = mnist_quality.main(["--samples", path])[2]  # arr_1 = the prompt's index = the digit it asks for
  print("\n| prompt asks for the digit the judge sees | confident (p >= 0.9) | balance | FD to held-out digits |")
  print("|---|---|---|---|")
  print(f"| {row['accuracy']:.1%} | {row['confident']:.1%} | {row['balance']:.2f} | {row['fd']:.2f} |")
  print("\n| phase | wall time (s) |\n|---|---|")
  for name, seconds in times.items():
    print(f"| {name} | {seconds:.0f} |")
  print(f"| total | {sum(times.values()):.0f} |")
  with np.load(path) as f:
    block = guidance_demo.class_rows(f["arr_0"], f["arr_1"], per_class=min(10, args.num_samples // 10))
  grid = os.path.join(args.workdir, "ldm_grid.png")
  image = Image.fromarray(block)
  image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(grid)
  print(f"grid (a row per prompt, 'a handwritten zero' to 'a handwritten nine'): {grid}")
  return row, times


if __name__ == "__main__":
  main(sys.argv[1:])
