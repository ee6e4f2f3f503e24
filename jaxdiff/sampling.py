"""Sampling: a jitted scan sampler over the mesh, PNG grids, and `.npz` files in the guided-diffusion format."""

import functools
import glob
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from jaxdiff.diffusion import create_diffusion, get_sampler
from jaxdiff.progress import progress_bar
from jaxdiff.train import experiment as experiment_lib


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] floats to uint8 [0, 255], rounding as the guided-diffusion sampler does."""
  return jnp.clip((images + 1) * 127.5 + 0.5, 0, 255).astype(jnp.uint8)


def make_sample_fn(exp: experiment_lib.Experiment, *, clip_denoised: bool):
  """jit(params, keys [B], labels [B] | None) -> uint8 images [B, H, W, C], batch sharded over the mesh.

  Uses the sampler, respacing and eta of `config.sample`.
  """
  s = exp.config.sample
  sampler = get_sampler(s.sampler, eta=s.eta)
  diffusion = create_diffusion(exp.config.diffusion, s.timestep_respacing)

  def sample(diffusion, params, keys, labels):
    def denoise(x, t):
      return exp.model.apply({"params": params}, x, t, labels, train=False)
    return to_uint8(sampler(diffusion, denoise, keys, exp.sample_shape, clip_denoised=clip_denoised))

  # The process is an argument, not a constant folded into the program.
  return functools.partial(jax.jit(sample, out_shardings=exp.batch_sharding), diffusion)


def sample_keys(seed: int, indices: np.ndarray) -> jax.Array:
  """One key per global sample index, so a sample is the same whatever batch or device drew it."""
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.asarray(indices, jnp.uint32))


def class_labels(indices: np.ndarray, num_classes: int) -> np.ndarray | None:
  """Labels cycling through the classes, so a grid shows every class in order."""
  return (indices % num_classes).astype(np.int32) if num_classes else None


def draw_indices(exp, sample_fn, params, *, seed: int, indices: np.ndarray):
  """Images and labels of the given global sample indices, gathered on every process."""
  keys = jax.device_put(sample_keys(seed, indices), exp.batch_sharding)
  labels = class_labels(indices, exp.num_classes)
  device_labels = None if labels is None else jax.device_put(labels, exp.batch_sharding)
  images = multihost_utils.process_allgather(sample_fn(params, keys, device_labels), tiled=True)
  return np.asarray(images), labels


def save_grid(images: np.ndarray, path: str, *, scale: int = 0) -> str:
  """Writes uint8 [N, H, W, C] as a near-square PNG grid with 2-pixel gutters; upscales small images."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  pad = 2
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
  pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
  scale = scale or max(1, 256 // (cols * (w + pad)))
  if scale > 1:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  pil.save(path)
  return path


def save_npz(path: str, **arrays) -> str:
  """Writes named arrays atomically (a reader never sees a partial file): `arr_0` = uint8 [N, H, W, C] images and
  `arr_1` = labels is the guided-diffusion evaluation format."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path


def job_name(config, step: int) -> str:
  """Names the settings that decide the samples, so shards of different settings never mix."""
  s = config.sample
  source = "pytorch" if config.model.init_from else f"step{step}"
  steps = f"_{s.timestep_respacing}" if s.timestep_respacing else ""
  ema = "ema" if s.use_ema else "raw"
  return f"{source}_{ema}_{s.sampler}{steps}_seed{s.seed}"


def _finished_indices(shard_dir: str, num_samples: int) -> np.ndarray:
  """A [num_samples] mask of the sample indices already in finished shards (as process 0 sees them)."""
  done = np.zeros(num_samples, bool)
  if jax.process_index() == 0:
    for path in glob.glob(os.path.join(shard_dir, "shard_*.npz")):
      with np.load(path) as shard:
        indices = shard["indices"]
      done[indices[indices < num_samples]] = True
  return np.asarray(multihost_utils.broadcast_one_to_all(done))


def _assemble(shard_dir: str, num_samples: int):
  """All finished shards as one array in global index order (each index once)."""
  images, labels = None, None
  for path in sorted(glob.glob(os.path.join(shard_dir, "shard_*.npz"))):
    with np.load(path) as shard:
      keep = shard["indices"] < num_samples
      idx = shard["indices"][keep]
      if images is None:
        images = np.zeros((num_samples, *shard["arr_0"].shape[1:]), np.uint8)
        labels = np.zeros(num_samples, np.int32) if "arr_1" in shard else None
      images[idx] = shard["arr_0"][keep]
      if labels is not None:
        labels[idx] = shard["arr_1"][keep]
  return images, labels


def run(config, workdir: str) -> dict:
  """Writes `sample.num_samples` images of the workdir's newest checkpoint as numbered .npz shards, then one .npz.

  Sample i comes from the key fold_in(sample.seed, i), so the result does not depend on the batch size or the number
  of devices or processes. Shards are written atomically and a rerun skips the samples they hold: a killed job,
  rerun, ends with the same N samples as an uninterrupted one.
  """
  exp = experiment_lib.build(config)
  params, step = exp.restore_params(workdir, use_ema=config.sample.use_ema)
  s = config.sample
  job_dir = os.path.join(workdir, "samples", job_name(config, step))
  shard_dir = os.path.join(job_dir, "shards")
  todo = np.flatnonzero(~_finished_indices(shard_dir, s.num_samples))
  is_main = jax.process_index() == 0
  sample_fn = make_sample_fn(exp, clip_denoised=s.clip_denoised)
  start_time = time.time()
  with progress_bar(total=s.num_samples, initial=s.num_samples - len(todo), desc="sampling", unit="img",
            disable=not is_main) as bar:
    for first in range(0, len(todo), s.batch_size):
      chunk = todo[first:first + s.batch_size]
      # Padding keeps one compiled shape; the padded samples are drawn and dropped.
      padded = np.concatenate([chunk, np.full(s.batch_size - len(chunk), chunk[-1])])
      images, labels = draw_indices(exp, sample_fn, params, seed=s.seed, indices=padded)
      if is_main:
        arrays = dict(arr_0=images[:len(chunk)], indices=chunk)
        if labels is not None:
          arrays["arr_1"] = labels[:len(chunk)]
        save_npz(os.path.join(shard_dir, f"shard_{chunk[0]:08d}.npz"), **arrays)
      bar.update(len(chunk))
  seconds = time.time() - start_time
  summary = {"step": step, "num_samples": s.num_samples, "sampled_now": len(todo), "seconds": seconds,
             "images_per_second": len(todo) / seconds if seconds else 0.0}
  if is_main:
    images, labels = _assemble(shard_dir, s.num_samples)
    n, h, w, c = images.shape
    summary["grid"] = save_grid(images[:256], os.path.join(job_dir, f"grid_{n}x{h}x{w}x{c}.png"))
    summary["npz"] = save_npz(os.path.join(job_dir, f"samples_{n}x{h}x{w}x{c}.npz"),
                              **({"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}))
  return summary
