"""Samples one trained model with several samplers and step counts from the same seeds, for judging by eye.

  python benchmarks/sampler_grids.py --config configs/ddpm_mnist.py --workdir runs/mnist \
      --settings ancestral:1000,ddim:10,ddim:25,ddim:50,ddim:250,dpm_solver++:10,dpm_solver++:25

Writes `<workdir>/sampler_grids/<sampler>_<steps>.png` (sample i is drawn from the same key in every grid), all of
them titled on one page (`all.png`, a row per sampler), and prints a markdown table of the time each setting took.
"""

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdiff import cli  # noqa: E402

flags.DEFINE_string("settings", "ancestral:1000,ancestral:250,ddim:10,ddim:25,ddim:50,ddim:250,dpm_solver++:10,dpm_solver++:25,"
                    "dpm_solver++:50,dpm_solver++:250", "Comma-separated sampler:steps pairs.")
flags.DEFINE_integer("num_samples", 64, "Images per grid.")


def respacing(sampler: str, steps: int, num_timesteps: int) -> str:
  """The sample.timestep_respacing string for `steps` steps; DDIM-style even strides for the ODE samplers."""
  if steps == num_timesteps:
    return ""
  return f"ddim{steps}" if sampler != "ancestral" else str(steps)


def montage(grids: list[tuple[str, str]], out_dir: str) -> str:
  """The titled grids on one page, a row per sampler (at most four grids a row)."""
  from PIL import Image, ImageDraw
  rows = []
  for title, path in grids:
    sampler = title.split()[0]
    if not rows or rows[-1][0] != sampler or len(rows[-1][1]) == 4:
      rows.append((sampler, []))
    rows[-1][1].append((title, Image.open(path).convert("L")))
  cell_w = max(im.width for _, row in rows for _, im in row) + 12
  cell_h = max(im.height for _, row in rows for _, im in row) + 20
  page = Image.new("L", (4 * cell_w, len(rows) * cell_h), 255)
  draw = ImageDraw.Draw(page)
  for r, (_, row) in enumerate(rows):
    for c, (title, im) in enumerate(row):
      draw.text((c * cell_w, r * cell_h + 2), title, fill=0)
      page.paste(im, (c * cell_w, r * cell_h + 16))
  return page.save(os.path.join(out_dir, "all.png")) or os.path.join(out_dir, "all.png")


def main(argv):
  del argv
  import jax
  import numpy as np
  from jaxdiff import sampling
  from jaxdiff.train import experiment

  base = cli.FLAGS.config
  out_dir = os.path.join(cli.FLAGS.workdir, "sampler_grids")
  rows = []
  params = None
  for setting in flags.FLAGS.settings.split(","):
    name, steps = setting.split(":")
    if int(steps) > base.diffusion.num_timesteps:
      print(f"skipping {setting}: more steps than diffusion.num_timesteps={base.diffusion.num_timesteps}")
      continue
    config = base.copy_and_resolve_references()
    config.sample.sampler = name
    config.sample.timestep_respacing = respacing(name, int(steps), config.diffusion.num_timesteps)
    exp = experiment.build(config)
    if params is None:
      params, _ = exp.restore_params(cli.FLAGS.workdir, use_ema=config.sample.use_ema)
    sample_fn = sampling.make_sample_fn(exp, clip_denoised=config.sample.clip_denoised)
    n = -(-flags.FLAGS.num_samples // jax.device_count()) * jax.device_count()
    start = time.time()
    images, _ = sampling.draw_indices(sample_fn, params, seed=config.sample.seed, indices=np.arange(n))
    seconds = time.time() - start  # includes compilation, once per setting
    path = sampling.save_grid(images[:flags.FLAGS.num_samples], os.path.join(out_dir, f"{name}_{steps}.png"))
    rows.append((name, steps, seconds, path))
  print(f"all grids: {montage([(f'{name} {steps} steps', path) for name, steps, _, path in rows], out_dir)}")
  print("| sampler | steps | seconds (incl. compile) | grid |\n|---|---|---|---|")
  for name, steps, seconds, path in rows:
    print(f"| {name} | {steps} | {seconds:.1f} | {path} |")


if __name__ == "__main__":
  cli.define_flags(job="sample")
  app.run(main, flags_parser=cli.parse_flags)
