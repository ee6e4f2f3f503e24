"""Sampling: a jitted scan sampler over the mesh, PNG grids, and `.npz` files in the guided-diffusion format."""

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from jaxdiff import convert
from jaxdiff.diffusion import create_diffusion, get_sampler
from jaxdiff.errors import CheckpointError
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


def draw(exp, sample_fn, params, *, seed: int, start: int, count: int):
  """Images and labels of global sample indices [start, start + count)."""
  indices = np.arange(start, start + count)
  keys = jax.device_put(sample_keys(seed, indices), exp.batch_sharding)
  labels = class_labels(indices, exp.num_classes)
  if labels is not None:
    labels = jax.device_put(labels, exp.batch_sharding)
  return np.asarray(jax.device_get(sample_fn(params, keys, labels))), labels


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


def save_npz(path: str, images: np.ndarray, labels: np.ndarray | None) -> str:
  """`arr_0` = uint8 [N, H, W, C] (and `arr_1` = labels), written atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  arrays = [images] if labels is None else [images, labels]
  np.savez(tmp, *arrays)
  os.replace(tmp, path)
  return path


def run(config, workdir: str) -> dict:
  """Restores the newest checkpoint of `workdir` and writes `sample.num_samples` images as a grid and an .npz."""
  exp = experiment_lib.build(config)
  if config.model.init_from:
    # Converted PyTorch weights replace the checkpoint; the outputs are tagged step 0.
    params = convert.load_for_model(config.model.init_from, exp.model, image_size=config.data.image_size,
                                    in_channels=config.data.channels)
    params, step = jax.device_put(params, exp.state_sharding.params), 0
  else:
    checkpointer = exp.checkpointer(workdir)
    state = checkpointer.restore(exp.abstract_state_with_sharding()) if checkpointer.all_steps() else None
    checkpointer.close()
    if state is None:
      raise CheckpointError(f"No checkpoint in {os.path.join(os.path.abspath(workdir), 'checkpoints')}: "
                            "train first with train.py --workdir, or pass the workdir of a trained run.")
    step = int(state.step)
    params = state.ema_params if config.sample.use_ema else state.params
  s = config.sample
  sample_fn = make_sample_fn(exp, clip_denoised=s.clip_denoised)
  out_dir = os.path.join(workdir, "samples")
  images, labels = [], []
  start_time = time.time()
  with tqdm(total=s.num_samples, desc="sampling", unit="img") as bar:
    for start in range(0, s.num_samples, s.batch_size):
      batch_images, batch_labels = draw(exp, sample_fn, params, seed=s.seed, start=start, count=s.batch_size)
      take = min(s.batch_size, s.num_samples - start)
      images.append(batch_images[:take])
      if batch_labels is not None:
        labels.append(np.asarray(batch_labels)[:take])
      bar.update(take)
  seconds = time.time() - start_time
  images = np.concatenate(images)
  labels = np.concatenate(labels) if labels else None
  n, h, w, c = images.shape
  tag = f"{n}x{h}x{w}x{c}_step{step}"
  grid_path = save_grid(images[:256], os.path.join(out_dir, f"grid_{tag}.png"))
  npz_path = save_npz(os.path.join(out_dir, f"samples_{tag}.npz"), images, labels)
  return {"step": step, "num_samples": n, "seconds": seconds, "images_per_second": n / seconds,
          "grid": grid_path, "npz": npz_path}
