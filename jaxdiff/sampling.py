"""Sampling: a jitted scan sampler over the mesh, PNG grids, and `.npz` files in the guided-diffusion format.

A sampling job is resumable: it writes numbered shards, and a rerun draws only the indices no shard holds. The job's
folder is named by its identity, every setting that can change an image (including a fingerprint of the weights),
so a job never reuses another setting's shards. Every device runs the same compiled program on
`sample.per_device_batch_size` images, so an image is bitwise the same whatever the number of devices or processes.
"""

import glob
import hashlib
import json
import logging
import math
import os
import shutil
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from jaxdiff import weights
from jaxdiff.diffusion import create_diffusion, get_sampler, guidance, samplers
from jaxdiff.errors import ConfigError, UserError
from jaxdiff.models import conditioning
from jaxdiff.progress import progress_bar
from jaxdiff.train import experiment as experiment_lib
from jaxdiff.train import mesh as mesh_lib

SHARD_PATTERN = "shard_*.npz"
OUTPUTS = ("uint8", "float", "latents")
# Temporary files start with a dot: no reader's pattern matches them.
_PARTIAL_PREFIX = ".partial-"

# Config entries that cannot change an image: how many are drawn and how they are batched and laid out, what only
# training reads (the weights' fingerprint stands for the run that made them), and where the weights were read from.
# The classifier of classifier guidance joins the identity as the network and weights really used (`classifier`).
NOT_IN_JOB_IDENTITY = ("seed", "mesh", "distributed", "train", "likelihood", "data.name", "data.data_dir",
                       "data.image_dir", "data.split", "data.random_flip", "data.random_crop", "model.init_from",
                       "sample.per_device_batch_size", "sample.num_samples", "classifier", "sample.prompt_file",
                       "sample.init_images",  # its contents' fingerprint joins the identity
                       "sample.classifier_workdir", "sample.classifier_from", "text_encoder.init_from",
                       "text_encoder_2.init_from",
                       "latent.autoencoder_workdir",
                       # a pixel-space model reads neither; a latent job names its autoencoder's weights itself
                       "autoencoder", "autoencoder_loss")


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] floats to uint8 [0, 255], rounding as the guided-diffusion sampler does."""
  return jnp.clip((images + 1) * 127.5 + 0.5, 0, 255).astype(jnp.uint8)


def sample_keys(seed, indices: jax.Array) -> jax.Array:
  """One key per global sample index, so a sample is the same whatever batch or device drew it."""
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), indices.astype(jnp.uint32))


def class_labels(indices, num_classes: int, sample_cfg=None):
  """The class of each global sample index, as `sample.labels` says: cycling through the classes (so a grid shows
  every class in order), one fixed class, or drawn from (seed, index) alone; None when there are no classes."""
  if not num_classes:
    return None
  indices = np.asarray(indices)
  mode = "cycle" if sample_cfg is None else sample_cfg.labels
  if mode == "fixed":
    return np.full(indices.shape, sample_cfg.class_label, np.int32)
  if mode == "random":
    return np.array([np.random.default_rng([sample_cfg.seed, int(i)]).integers(num_classes) for i in indices],
                    np.int32)
  return (indices % num_classes).astype(np.int32)


def read_prompts(sample_cfg) -> list[str]:
  """The prompts of `sample.prompt` or `sample.prompt_file` (one a line, blank lines skipped)."""
  if sample_cfg.prompt_file:
    with open(sample_cfg.prompt_file, encoding="utf-8") as f:
      prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
      raise ConfigError(f"sample.prompt_file={sample_cfg.prompt_file} holds no prompt: write one prompt a line.")
    return prompts
  return [sample_cfg.prompt] if sample_cfg.prompt else []


class SampleFn:
  """(params, seed, indices: uint32 [B] host array) -> uint8 images [B, H, W, C] as a global array.

  B must be a multiple of the device count. `jitted` and `device_args` expose the program for benchmarks. With
  `classifier` (a (network, params) pair) and sample.classifier_scale > 0, the classifier's gradient guides every
  step; sample.guidance_scale != 1 runs classifier-free guidance against the condition's null value (the null class,
  or the negative prompt's tokens). A latent model samples latents and decodes them with its frozen autoencoder in
  the same program; a text-conditioned one draws sample i from prompt i mod the number of prompts. `output`:
  "uint8" images, "float" images in [-1, 1], or "latents" (what the sampler ends with, undecoded: a base model's
  handoff to a refiner). With sample.strength < 1 or sample.denoising_start > 0, sample i starts from init i mod
  the number of inits (`set_init`: uint8 images, encoded and noised as SDEdit, or float latents used as they are).
  """

  def __init__(self, exp: experiment_lib.Experiment, *, clip_denoised: bool, classifier=None, prompts=None,
               negative_prompt: str | None = None, output: str = "uint8"):
    s = exp.config.sample
    sampler = get_sampler(s.sampler, eta=s.eta)
    if output not in OUTPUTS:
      raise ConfigError(f"output={output!r}: use one of {', '.join(OUTPUTS)}.")
    self._replicated = NamedSharding(exp.mesh, P())
    self._batch_sharding = exp.batch_sharding
    self.num_classes = exp.num_classes or (classifier[0].out_channels if classifier else 0)
    if self.num_classes and s.labels == "fixed" and s.class_label >= self.num_classes:
      raise ConfigError(f"sample.class_label={s.class_label} is not a class of this model: use one of 0.."
                        f"{self.num_classes - 1}.")
    self._sample_cfg = s
    self._condition = exp.condition
    micro = isinstance(exp.condition, conditioning.MicroConditioner)
    self._text = isinstance(exp.condition.base if micro else exp.condition, conditioning.TextConditioner)
    self._micro_keys = exp.condition.keys if micro else ()
    height, width, _ = exp.sample_shape
    self.set_micro_conditioning(original_size=tuple(s.original_size) or (height, width),
                                crops_coords_top_left=tuple(s.crops_coords_top_left),
                                target_size=tuple(s.target_size) or (height, width),
                                aesthetic_score=s.aesthetic_score, negative_aesthetic_score=s.negative_aesthetic_score)
    self.prompts = list(prompts if prompts is not None else read_prompts(s)) if self._text else []
    if self._text and not self.prompts:
      raise ConfigError("A text-conditioned model samples from prompts: set --config.sample.prompt or "
                        "--config.sample.prompt_file.")
    self._tokenizer = exp.tokenizer
    if self._text:
      self.set_negative_prompt(s.negative_prompt if negative_prompt is None else negative_prompt)
    self._classifier_params = classifier[1] if classifier else None
    self._frozen = exp.frozen_params() if exp.first_stage is not None else {}
    # The process is an argument, not a constant folded into the program.
    process = create_diffusion(exp.config.diffusion, s.timestep_respacing, sampler=s.sampler,
                               steps_offset=s.steps_offset, set_alpha_to_one=s.set_alpha_to_one)
    self._diffusion = mesh_lib.host_to_mesh(process, self._replicated, process_local=False)
    steps = samplers.step_range(process, num_train_timesteps=exp.config.diffusion.num_timesteps, strength=s.strength,
                                denoising_start=s.denoising_start, denoising_end=s.denoising_end)
    self.partial = (s.strength < 1 or s.denoising_start > 0)  # runs from init images or latents
    self._init = None
    self._shape, self.sample_shape = exp.diffusion_shape, exp.sample_shape
    guidance_scale = float(s.guidance_scale) if exp.condition is not None else 1.0
    model, stage = exp.model, exp.first_stage
    wrapped = isinstance(model, conditioning.ConditionedUNet)

    def start(diffusion, frozen, keys, init):
      """The state the run starts from: None (x_T from the keys), or the init images encoded and noised to the
      first step (SDEdit), or init latents as they are (a refiner continuing a base's run)."""
      if init is None:
        return None
      if init.dtype == jnp.uint8:
        x0 = init.astype(jnp.float32) / 127.5 - 1.0
        if stage is not None:  # the posterior's mean: diffusers samples it, which only adds noise
          encoded = stage.model.apply({"params": frozen["autoencoder"]}, x0, method=stage.model.encode)
          x0 = stage.scale_factor * (encoded.mode() if hasattr(encoded, "mode") else encoded)
        init = x0
      return samplers.sdedit_init(diffusion, keys, init, steps.start) if steps.add_noise else init

    def sample(diffusion, params, frozen, classifier_params, seed, indices, cond, null, init):
      variables = {"params": {**params, **experiment_lib.frozen_embedders(frozen)}}
      if wrapped:  # embedded once, outside the sampling loop
        cond = model.apply(variables, cond, method=model.embed)
        null = model.apply(variables, null, method=model.embed) if guidance_scale != 1 else None

      def apply(x, t, c):
        if wrapped:
          return model.apply(variables, x, t, c, train=False, method=model.denoise)
        return model.apply(variables, x, t, c or None, train=False)
      denoise = guidance.classifier_free(apply, cond, null if guidance_scale != 1 else None, guidance_scale,
                                         diffusion)
      guide = None
      if classifier is not None:
        logits = lambda x, t: classifier[0].apply({"params": classifier_params}, x, t, train=False)
        guide = guidance.classifier_guide(logits, cond["label"], float(s.classifier_scale))
      keys = sample_keys(seed, indices)
      images = sampler(diffusion, denoise, keys, exp.diffusion_shape, clip_denoised=clip_denoised, guide=guide,
                       x_init=start(diffusion, frozen, keys, init), start=steps.start, stop=steps.stop)
      if output == "latents":
        return images.astype(jnp.float32)
      if stage is not None:
        images = stage.model.apply({"params": frozen["autoencoder"]}, images / stage.scale_factor,
                                   method=stage.model.decode)
      return jnp.clip(images.astype(jnp.float32), -1, 1) if output == "float" else to_uint8(images)

    self.jitted = jax.jit(sample, out_shardings=exp.batch_sharding)

  def set_init(self, init: np.ndarray | None):
    """What sample i starts from: init[i mod len(init)], uint8 images [N, H, W, C] of the sampled size or float
    latents [N, h, w, c] (None: x_T)."""
    if init is None:
      self._init = None
      return
    init = np.asarray(init)
    pixels = init.dtype == np.uint8
    want = self.sample_shape if pixels else self._shape
    if init.ndim != 4 or tuple(init.shape[1:]) != tuple(want):
      raise ConfigError(f"The init {'images' if pixels else 'latents'} have shape {init.shape}; this model samples "
                        f"[N, {', '.join(map(str, want))}]: give images of sample.height x sample.width (uint8) or "
                        "latents of that size (float).")
    self._init = init if pixels else init.astype(np.float32)

  def set_negative_prompt(self, text: str):
    """The prompt of the unconditional half of classifier-free guidance ("" = the null caption it trained with: the
    empty prompt's tokens, or a zero embedding for a model trained with latent.text_null='zeros')."""
    self._null_tokens = np.asarray(self._tokenizer([text])[0], np.int32)
    self._zero_negative = text == "" and getattr(self._condition.base if self._micro_keys else self._condition,
                                                 "zero_null", False)

  def set_micro_conditioning(self, *, original_size, crops_coords_top_left, target_size, aesthetic_score,
                             negative_aesthetic_score):
    """SDXL's micro-conditioning of every sample, (height, width) / (top, left) pairs; the guidance's unconditional
    half differs only in its aesthetic score, as in diffusers."""
    values = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size)
    self._micro = {**values, "aesthetic_score": (aesthetic_score,)}
    self._negative_micro = {**values, "aesthetic_score": (negative_aesthetic_score,)}

  def labels(self, indices) -> np.ndarray | None:
    """Each sample's class, or for a text-conditioned model the index of its prompt."""
    if self._text:
      return (np.asarray(indices) % len(self.prompts)).astype(np.int32)
    return class_labels(indices, self.num_classes, self._sample_cfg)

  def conditions(self, indices) -> tuple[dict, dict]:
    """The raw condition of each index and its null value, as host arrays."""
    n = len(indices)
    labels = self.labels(indices)
    batch, negative = {}, {}
    if self._text:
      batch["tokens"] = np.asarray(self._tokenizer([self.prompts[i] for i in labels]), np.int32)
      negative["tokens"] = np.tile(self._null_tokens, (n, 1))
    elif labels is not None:
      batch["label"], negative["label"] = labels, np.full(n, self.num_classes, np.int32)
    if self._condition is None:  # classifier guidance of an unconditional model: the labels guide
      return batch, negative
    for key in self._micro_keys:
      batch[key] = np.tile(np.asarray(self._micro[key], np.float32), (n, 1))
      negative[key] = np.tile(np.asarray(self._negative_micro[key], np.float32), (n, 1))
    cond, null = (jax.tree.map(np.asarray, self._condition.from_batch(b)) for b in (batch, negative))
    if self._text and self._zero_negative:
      null["keep"]["text"] = np.zeros(n, np.float32)
    return cond, null

  def device_args(self, params, seed: int, indices: np.ndarray) -> tuple:
    cond, null = self.conditions(indices)
    put = lambda tree: mesh_lib.host_to_mesh(tree, self._batch_sharding, process_local=False)
    return (self._diffusion, params, self._frozen, self._classifier_params,
            mesh_lib.host_to_mesh(np.uint32(seed), self._replicated, process_local=False),
            put(np.asarray(indices, np.uint32)), put(cond), put(null), self._inits(indices, put))

  def _inits(self, indices, put):
    if not self.partial:
      return None
    if self._init is None:
      raise ConfigError("sample.strength < 1 or sample.denoising_start > 0 starts from init images or latents: set "
                        "--config.sample.init_images (or pass image= to the pipeline).")
    return put(self._init[np.asarray(indices) % len(self._init)])

  def __call__(self, params, seed: int, indices: np.ndarray) -> jax.Array:
    return self.jitted(*self.device_args(params, seed, indices))


def make_sample_fn(exp: experiment_lib.Experiment, *, clip_denoised: bool, classifier=None, **kwargs) -> SampleFn:
  """The sampler, respacing, eta and guidance of `config.sample` as one jitted program over the mesh."""
  return SampleFn(exp, clip_denoised=clip_denoised, classifier=classifier, **kwargs)


def draw_indices(sample_fn, params, *, seed: int, indices: np.ndarray):
  """Images (on every process) and labels of the given global sample indices; len(indices) is a multiple of the
  device count."""
  images = multihost_utils.process_allgather(sample_fn(params, seed, indices), tiled=True)
  return np.asarray(images), sample_fn.labels(np.asarray(indices))


def pad_to(indices: np.ndarray, size: int) -> np.ndarray:
  """`indices` padded to `size` by repeating the last one (padded samples are drawn and dropped)."""
  return np.concatenate([indices, np.full(size - len(indices), indices[-1], indices.dtype)])


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
  directory, name = os.path.split(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f"{_PARTIAL_PREFIX}{os.getpid()}-{name}")
  with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return path


def params_fingerprint(params) -> str:
  """A 64-bit digest of the parameter values (and their paths, shapes and dtypes), computed on the devices.

  Integer sums wrap exactly in any order, so the digest does not depend on how the parameters are sharded.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  layout = ";".join(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}" for path, leaf in leaves)

  @jax.jit
  def digest(values):
    total = jnp.zeros((2,), jnp.uint32)
    for i, value in enumerate(values):
      bits = jax.lax.bitcast_convert_type(value, jnp.dtype(f"uint{value.dtype.itemsize * 8}")).astype(jnp.uint32)
      position = jnp.arange(bits.size, dtype=jnp.uint32) + jnp.uint32(i * 0x9E3779B1 & 0xFFFFFFFF)
      # Two odd multipliers per position: a changed, moved or swapped value changes both sums.
      total += jnp.stack([jnp.sum(bits.ravel() * (position * jnp.uint32(0x85EBCA6B) | 1)),
                          jnp.sum((bits.ravel() ^ jnp.uint32(0x5BD1E995)) * (position * jnp.uint32(0xC2B2AE35) | 1))])
    return total

  sums = np.asarray(digest([leaf for _, leaf in leaves]))
  return hashlib.sha256(f"{layout}|{sums[0]}|{sums[1]}".encode()).hexdigest()[:16]


def job_identity(config, *, step: int, fingerprint: str, classifier: dict | None = None,
                 extra: dict | None = None) -> dict:
  """Everything that decides a job's images: the config minus NOT_IN_JOB_IDENTITY, the weights, the guiding
  classifier (its network, source and weights' fingerprint) when sample.classifier_scale > 0, and `extra` (a latent
  model's frozen weights and prompts)."""
  settings = json.loads(config.to_json_best_effort())
  for key in NOT_IN_JOB_IDENTITY:
    *parents, last = key.split(".")
    section = settings
    for part in parents:
      section = section.get(part, {})
    section.pop(last, None)
  source = "pytorch" if config.model.init_from else "checkpoint"
  identity = {"settings": settings, "weights": {"source": source, "step": step, "fingerprint": fingerprint}}
  if classifier is not None:
    identity["classifier"] = classifier
  identity.update(extra or {})
  return identity


def latent_identity(exp: experiment_lib.Experiment, sample_fn: "SampleFn") -> dict:
  """What a latent model's images also depend on: the first stage (layout, scale, weights), a frozen text encoder's
  weights and the prompts themselves (a prompt file's path says nothing of its lines)."""
  frozen = exp.frozen_params()
  extra = {"first_stage": {**exp.first_stage.signature(), "fingerprint": params_fingerprint(frozen["autoencoder"])}}
  if "embedder" in frozen:
    extra["text_encoder_fingerprint"] = params_fingerprint(frozen["embedder"])
  if "embedder_2" in frozen:
    extra["text_encoder_2_fingerprint"] = params_fingerprint(frozen["embedder_2"])
  if sample_fn.prompts:
    extra["prompts"] = sample_fn.prompts
  return extra


def read_init(path: str) -> np.ndarray:
  """sample.init_images: an .npz whose arr_0 is uint8 images [N, H, W, C] (e.g. a sampling job's) or float latents
  [N, h, w, c] (a job run with sample.denoising_end < 1)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      init = f["arr_0"]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"sample.init_images={path} is not an .npz with arr_0 ({type(e).__name__}): give a sampling "
                    "job's samples_*.npz or a handoff's latents.") from None
  if init.dtype != np.uint8 and not np.issubdtype(init.dtype, np.floating):
    raise UserError(f"sample.init_images={path}: arr_0 is {init.dtype}; give uint8 images or float latents.")
  return init


def file_fingerprint(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def job_name(identity: dict) -> str:
  """A readable folder name of the main settings, then a digest of the whole identity."""
  s, w = identity["settings"]["sample"], identity["weights"]
  source = "pytorch" if w["source"] == "pytorch" else f"step{w['step']}"
  steps = f"_{s['timestep_respacing']}" if s["timestep_respacing"] else ""
  ema = "ema" if s["use_ema"] else "raw"
  guided = "".join([f"_cfg{s['guidance_scale']:g}" if s.get("guidance_scale", 1) != 1 else "",
                    f"_cls{s['classifier_scale']:g}" if s.get("classifier_scale", 0) else ""])
  digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
  return f"{source}_{ema}_{s['sampler']}{steps}{guided}_seed{s['seed']}_{digest}"


def _check_job_file(job_dir: str, identity: dict):
  """Writes `job.json` (the identity in full) beside the shards, or checks that the one there is the same."""
  path = os.path.join(job_dir, "job.json")
  if os.path.exists(path):
    with open(path) as f:
      try:
        saved = json.load(f)
      except ValueError:
        saved = None
    if saved is not None and saved != identity:
      raise UserError(f"{path} describes other settings than this job's: move {job_dir} aside and rerun.")
    if saved is not None:
      return
  os.makedirs(job_dir, exist_ok=True)
  tmp = os.path.join(job_dir, f"{_PARTIAL_PREFIX}{os.getpid()}-job.json")
  with open(tmp, "w") as f:
    json.dump(identity, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _read_shard(path: str, num_samples: int, image_shape: tuple[int, ...], dtype=np.uint8):
  """(indices, images, labels | None) of a shard, or None when it is damaged (then it is moved aside)."""
  try:
    with np.load(path, allow_pickle=False) as shard:
      indices, images = shard["indices"], shard["arr_0"]
      labels = shard["arr_1"] if "arr_1" in shard.files else None
    if (indices.ndim != 1 or images.shape != (len(indices), *image_shape) or images.dtype != dtype
        or (labels is not None and labels.shape != indices.shape)):
      raise ValueError(f"arrays of unexpected shapes: indices {indices.shape}, images {images.shape}")
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    aside = os.path.join(os.path.dirname(os.path.dirname(path)), "shards_unreadable")
    os.makedirs(aside, exist_ok=True)
    shutil.move(path, os.path.join(aside, f"{os.path.basename(path)}-{int(time.time())}"))
    logging.warning("Shard %s is unreadable (%s: %s); moved it to %s, and its samples are drawn again.", path,
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", aside)
    return None
  keep = (indices >= 0) & (indices < num_samples)
  return indices[keep], images[keep], None if labels is None else labels[keep]


def _finished_indices(shard_dir: str, num_samples: int, image_shape, dtype=np.uint8) -> np.ndarray:
  """A [num_samples] mask of the indices already in readable shards, as process 0 sees them, on every process."""
  done = np.zeros(num_samples, bool)
  if jax.process_index() == 0:
    for path in glob.glob(os.path.join(shard_dir, f"{_PARTIAL_PREFIX}*")):
      os.remove(path)  # left by a killed writer; only process 0 writes here
    for path in sorted(glob.glob(os.path.join(shard_dir, SHARD_PATTERN))):
      shard = _read_shard(path, num_samples, image_shape, dtype)
      if shard is not None:
        done[shard[0]] = True
  return np.asarray(multihost_utils.broadcast_one_to_all(done))


def _assemble(shard_dir: str, num_samples: int, image_shape, dtype=np.uint8):
  """All finished shards as one array in global index order (each index once)."""
  images = np.zeros((num_samples, *image_shape), dtype)
  labels = None
  for path in sorted(glob.glob(os.path.join(shard_dir, SHARD_PATTERN))):
    shard = _read_shard(path, num_samples, image_shape, dtype)
    if shard is None:
      raise UserError(f"shard {path} became unreadable while the job ran: rerun the same command to redraw it.")
    indices, shard_images, shard_labels = shard
    images[indices] = shard_images
    if shard_labels is not None:
      labels = np.zeros(num_samples, np.int32) if labels is None else labels
      labels[indices] = shard_labels
  return images, labels


def run(config, workdir: str) -> dict:
  """Writes `sample.num_samples` images of the workdir's newest checkpoint as numbered .npz shards, then one .npz.

  Sample i comes from the key fold_in(sample.seed, i) and every device computes `sample.per_device_batch_size`
  images with the same program, so the result does not depend on the number of devices or processes. Shards are
  written atomically by process 0 and a rerun skips the samples they hold: a killed job, rerun with any number of
  processes, ends with the same N samples as an uninterrupted one.
  """
  exp = experiment_lib.build(config, job="sample")
  params, step = weights.load(exp, workdir, use_ema=config.sample.use_ema)
  s = config.sample
  classifier, classifier_identity = None, None
  if s.classifier_scale > 0:
    network, classifier_params, described = weights.load_classifier(exp)
    classifier = (network, classifier_params)
    classifier_identity = dict(described, fingerprint=params_fingerprint(classifier_params))
  # A run stopped early (a base's part of a handoff) writes its latents as arr_0, for a refiner's init_images.
  handoff = s.denoising_end < 1
  sample_fn = make_sample_fn(exp, clip_denoised=s.clip_denoised, classifier=classifier,
                             output="latents" if handoff else "uint8")
  extra = latent_identity(exp, sample_fn) if exp.first_stage is not None else {}
  if sample_fn.partial:
    sample_fn.set_init(read_init(s.init_images))
    extra["init_images"] = file_fingerprint(s.init_images)
  identity = job_identity(config, step=step, fingerprint=params_fingerprint(params), classifier=classifier_identity,
                          extra=extra)
  job_dir = os.path.join(workdir, "samples", job_name(identity))
  shard_dir = os.path.join(job_dir, "shards")
  is_main = jax.process_index() == 0
  problem = ""
  if is_main:
    try:
      _check_job_file(job_dir, identity)
    except UserError as e:
      problem = str(e)
  # Every process stops if process 0 found a problem, rather than wait for it in a collective.
  if multihost_utils.broadcast_one_to_all(np.int32(bool(problem))):
    raise UserError(problem or f"{job_dir}/job.json describes other settings: see process 0's error.")
  shape, dtype = (exp.diffusion_shape, np.float32) if handoff else (exp.sample_shape, np.uint8)
  todo = np.flatnonzero(~_finished_indices(shard_dir, s.num_samples, shape, dtype))
  global_batch = s.per_device_batch_size * jax.device_count()
  start_time = time.time()
  with progress_bar(total=s.num_samples, initial=s.num_samples - len(todo), desc="sampling", unit="img",
                    disable=not is_main) as bar:
    for first in range(0, len(todo), global_batch):
      chunk = todo[first:first + global_batch]
      images, labels = draw_indices(sample_fn, params, seed=s.seed, indices=pad_to(chunk, global_batch))
      if is_main:
        arrays = dict(arr_0=images[:len(chunk)], indices=chunk)
        if labels is not None:
          arrays["arr_1"] = labels[:len(chunk)]
        save_npz(os.path.join(shard_dir, f"shard_{chunk[0]:08d}.npz"), **arrays)
      bar.update(len(chunk))
  seconds = time.time() - start_time
  summary = {"step": step, "job": job_dir, "num_samples": s.num_samples, "sampled_now": len(todo),
             "seconds": seconds, "images_per_second": len(todo) / seconds if seconds else 0.0}
  if is_main:
    images, labels = _assemble(shard_dir, s.num_samples, shape, dtype)
    n, h, w, c = images.shape
    if not handoff:
      summary["grid"] = save_grid(images[:256], os.path.join(job_dir, f"grid_{n}x{h}x{w}x{c}.png"))
    summary["npz"] = save_npz(os.path.join(job_dir, f"samples_{n}x{h}x{w}x{c}.npz"),
                              **({"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}))
  # Other processes must not exit (and tear down the distributed runtime) while process 0 writes.
  mesh_lib.barrier("jaxdiff_sampling_done")
  return summary
