"""The guidance demos on the bundled MNIST digits, run through train.py and sample.py, judged by a digit classifier
that never guides anything (benchmarks/mnist_quality.py: a CNN trained on 4,000 real digits).

  python benchmarks/guidance_demo.py --part cfg --workdir runs/guidance_demo         # classifier-free, w = 0,1,3,5
  python benchmarks/guidance_demo.py --part classifier --workdir runs/guidance_demo  # classifier guidance, s = 0,1,3,10

cfg: configs/cfg_mnist.py (class-conditional, class dropped 10% of the time) sampled at each guidance scale.
classifier: the main job's network without classes (configs/ddpm_mnist.py, model.class_conditional=False, 3,500
steps so that the whole demo fits 15 minutes), and configs/classifier_mnist.py's noisy classifier trained on 4,500 of
the digits, sampled at each classifier scale.
Each scale draws --num-samples images (labels cycling 0..9, ancestral sampling over 100 respaced steps for cfg, 50
for classifier guidance, whose classifier gradient costs a backward pass per step). Prints a
table (wall time of every phase; how often the judge names the requested digit; how often it is confident, p >= 0.9)
and writes <workdir>/<part>_grid.png: one block per scale, one row per digit.
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

import mnist_quality  # noqa: E402

# (config key, scales, respaced ancestral steps): a classifier's gradient costs a backward pass through it at every
# step, so classifier guidance samples over 50 steps to keep the demo within 15 minutes.
PARTS = {"cfg": ("guidance_scale", (0.0, 1.0, 3.0, 5.0), "100"),
         "classifier": ("classifier_scale", (0.0, 1.0, 3.0, 10.0), "50")}


def run(script, config, workdir, *overrides):
  start = time.time()
  subprocess.run([sys.executable, os.path.join(ROOT, script), f"--config={config}", f"--workdir={workdir}",
                  *overrides], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  return time.time() - start


def class_rows(images, labels, per_class):
  """uint8 grid: row c holds the first `per_class` samples of class c."""
  rows = [np.concatenate(list(images[labels == c][:per_class, ..., 0]), axis=1) for c in range(10)]
  return np.concatenate(rows, axis=0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=sorted(PARTS), required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num-samples", type=int, default=200)
  parser.add_argument("--smoke", action="store_true", help="tiny configs and few samples (for the tests)")
  args = parser.parse_args(argv)
  variant = ":smoke" if args.smoke else ""
  key, scales, steps = PARTS[args.part]
  times = {}
  sample_common = [f"--config.sample.num_samples={args.num_samples}", "--config.sample.labels=cycle",
                   f"--config.sample.per_device_batch_size={min(args.num_samples, 100)}"]
  if not args.smoke:
    sample_common.append(f"--config.sample.timestep_respacing={steps}")
  if args.part == "cfg":
    config, model_dir = f"configs/cfg_mnist.py{variant}", os.path.join(args.workdir, "cfg_model")
    model_overrides = []
    times["train diffusion model"] = run("train.py", config, model_dir)
  else:
    config, model_dir = f"configs/ddpm_mnist.py{variant}", os.path.join(args.workdir, "uncond_model")
    classifier_dir = os.path.join(args.workdir, "noisy_classifier")
    model_overrides = ["--config.model.class_conditional=False"]
    times["train diffusion model"] = run("train.py", config, model_dir, *model_overrides,
                                         *([] if args.smoke else ["--config.train.num_steps=3500"]))
    times["train noisy classifier"] = run("train.py", f"configs/classifier_mnist.py{variant}", classifier_dir)
    model_overrides.append(f"--config.sample.classifier_workdir={classifier_dir}")
  paths = {}
  for scale in scales:
    times[f"sample {key}={scale:g}"] = run("sample.py", config, model_dir, *model_overrides, *sample_common,
                                           f"--config.sample.{key}={scale}")
    done = sorted(os.path.join(root, f) for root, _, files in os.walk(os.path.join(model_dir, "samples"))
                  for f in files if f.startswith(f"samples_{args.num_samples}x"))
    paths[scale] = max(done, key=os.path.getmtime)
  rows = mnist_quality.main(sum((["--samples", paths[s]] for s in scales), []))[2:]
  print(f"\n| {key} | requested digit (judge) | confident (p >= 0.9) | balance |")
  print("|---|---|---|---|")
  for scale, row in zip(scales, rows):
    # Without guidance an unconditional model is asked for no class: its samples carry no labels.
    asked = f"{row['accuracy']:.1%}" if "accuracy" in row else "- (no class asked)"
    print(f"| {scale:g} | {asked} | {row['confident']:.1%} | {row['balance']:.2f} |")
  print("\n| phase | wall time (s) |\n|---|---|")
  for name, seconds in times.items():
    print(f"| {name} | {seconds:.0f} |")
  print(f"| total | {sum(times.values()):.0f} |")
  blocks = []
  for scale in scales:
    with np.load(paths[scale]) as f:
      labels = f["arr_1"] if "arr_1" in f.files else np.arange(len(f["arr_0"])) % 10  # unlabelled: by index
      block = class_rows(f["arr_0"], labels, per_class=min(8, args.num_samples // 10))
    blocks += [block, np.full((block.shape[0], 6), 255, np.uint8)]
  grid = os.path.join(args.workdir, f"{args.part}_grid.png")
  image = Image.fromarray(np.concatenate(blocks[:-1], axis=1))
  image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(grid)
  print(f"grid (one block per {key} in {', '.join(f'{s:g}' for s in scales)}; a row per digit): {grid}")
  return rows, times


if __name__ == "__main__":
  main(sys.argv[1:])
