"""What each `config.job` trains, for the one generic loop in loop.py: its jitted train step, its input batches and
what it shows people at `train.sample_every` and at the end (a sample grid; accuracy by t on a held-out split;
inputs beside reconstructions, PSNR/SSIM and the latent scale factor).

A job is built from an Experiment and provides
  train_step()                              -> jitted (state, batch) -> (state, metrics), the state donated
  show(state, workdir, step, writer) -> dict   merged into the run's summary (e.g. {"grid": path})
Every job reads its batches with `input_batches`.
"""

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdiff import data as data_lib
from jaxdiff.data import buckets as buckets_lib
from jaxdiff import sampling
from jaxdiff.diffusion import parse_loss, parse_timestep_sampler
from jaxdiff.models import lpips
from jaxdiff.train import autoencoder as autoencoder_train
from jaxdiff.train import experiment as experiment_lib
from jaxdiff.train.latent import LATENT_SCALE_FILE  # the latent job reads what the autoencoder job writes
from jaxdiff.train import mesh as mesh_lib
from jaxdiff.train.state import classifier_outputs, classifier_train_step, train_step


def _jit_step(exp: experiment_lib.Experiment, step):
  """The step with the state donated, the state's sharding kept and the batch split over the data axis."""
  return jax.jit(step, donate_argnums=0, in_shardings=(exp.state_sharding, exp.batch_sharding),
                 out_shardings=(exp.state_sharding, None))


def input_batches(exp: experiment_lib.Experiment, start_step: int, *, split: str | None = None,
                  augment: bool = True):
  """This process's input batches from `start_step` on, in the order an uninterrupted run sees them."""
  d = exp.config.data
  return data_lib.train_batches(
      name=d.name, data_dir=d.data_dir, image_dir=d.image_dir, split=split or d.split, image_size=d.image_size,
      channels=d.channels, batch_size=exp.config.train.batch_size // jax.process_count(), seed=exp.config.seed,
      random_flip=d.random_flip and augment, random_crop=d.random_crop and augment, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(), crop=d.crop if augment else "center",
      buckets=buckets_lib.sdxl_buckets(d.image_size, d.bucket_multiple) if d.multi_aspect else None,
      **data_lib.caption_options(d, exp.tokenizer))


def _base_key(exp):
  return jax.random.fold_in(jax.random.key(exp.config.seed), 1)


class DiffusionJob:
  """Pixel-space diffusion: the loss of `config.diffusion`, and an EMA sample grid."""

  def __init__(self, exp: experiment_lib.Experiment):
    self.exp = exp
    self._sample_fn = None

  def train_step(self):
    exp, t = self.exp, self.exp.config.train
    return _jit_step(exp, functools.partial(
        train_step, apply_fn=exp.model.apply, diffusion=exp.diffusion, tx=exp.tx, base_key=_base_key(exp),
        ema_decay=t.ema_decay, condition=exp.condition,
        loss_type=parse_loss(exp.config.diffusion.loss, exp.diffusion.var_type),
        vlb_weight=exp.config.diffusion.vlb_weight, min_snr_gamma=exp.config.diffusion.min_snr_gamma,
        timestep_sampler=parse_timestep_sampler(t.timestep_sampler), grad_accum_steps=t.grad_accum_steps,
        cond_drop_prob=t.cond_drop_prob if exp.null_class else 0.0))

  def show(self, state, workdir: str, step: int, writer) -> dict:
    """Draws the EMA grid on every device; process 0 writes it."""
    del writer
    exp = self.exp
    n = exp.config.train.num_grid_samples
    count = -(-n // jax.device_count()) * jax.device_count()
    if self._sample_fn is None:
      self._sample_fn = sampling.make_sample_fn(exp, clip_denoised=exp.config.sample.clip_denoised,
                                                prompts=grid_prompts(exp))
    images, _ = sampling.draw_indices(self._sample_fn, state.ema_params, seed=exp.config.sample.seed,
                                      indices=sampling.pad_to(np.arange(n), count))
    path = os.path.join(workdir, "samples", f"train_grid_step{step:07d}.png")
    if jax.process_index() == 0:
      sampling.save_grid(images[:n], path)
    return {"grid": path}


def grid_prompts(exp: experiment_lib.Experiment, limit: int = 64) -> list[str] | None:
  """A text-conditioned model's grid prompts: `sample.prompt(_file)`, else the data's captions (one per class for
  label captions, so the grid shows every class in order; else the first distinct captions)."""
  if exp.tokenizer is None:
    return None
  prompts = sampling.read_prompts(exp.config.sample)
  if prompts:
    return prompts
  d = exp.config.data
  options = dict(name=d.name, data_dir=d.data_dir, image_dir=d.image_dir, split=d.split)
  if d.captions == "label":
    return list(data_lib.class_captions(**options, caption_template=d.caption_template,
                                        class_names=tuple(d.class_names)))
  return list(dict.fromkeys(data_lib.captions_of(**options, **data_lib.caption_options(d))))[:limit]


class LatentDiffusionJob(DiffusionJob):
  """Latent diffusion: the diffusion loss on the frozen first stage's scaled latents, drawn in the step; the sample
  grid is decoded by the same autoencoder. Frozen weights (autoencoder, a frozen text encoder) are arguments of the
  jitted step, not part of the train state."""

  def train_step(self):
    exp, t = self.exp, self.exp.config.train
    frozen = exp.frozen_params()
    replicated = NamedSharding(exp.mesh, P())
    stage = exp.first_stage

    def step(state, batch, frozen):
      embedder = experiment_lib.frozen_embedders(frozen)

      def apply_fn(variables, *args, **kwargs):
        return exp.model.apply({"params": {**variables["params"], **embedder}}, *args, **kwargs)

      def encode(images, key):
        return stage.scale_factor * autoencoder_train.latents(stage.model, frozen["autoencoder"], images, key)

      return train_step(
          state, batch, apply_fn=apply_fn, encode=encode, diffusion=exp.diffusion, tx=exp.tx,
          base_key=_base_key(exp), ema_decay=t.ema_decay, condition=exp.condition,
          loss_type=parse_loss(exp.config.diffusion.loss, exp.diffusion.var_type),
          vlb_weight=exp.config.diffusion.vlb_weight, min_snr_gamma=exp.config.diffusion.min_snr_gamma,
          timestep_sampler=parse_timestep_sampler(t.timestep_sampler), grad_accum_steps=t.grad_accum_steps,
          cond_drop_prob=t.cond_drop_prob if exp.condition is not None else 0.0)

    jitted = jax.jit(step, donate_argnums=0, in_shardings=(exp.state_sharding, exp.batch_sharding, replicated),
                     out_shardings=(exp.state_sharding, None))
    return lambda state, batch: jitted(state, batch, frozen)


class ClassifierJob:
  """The noisy classifier of classifier guidance; shows its loss and accuracy per quarter of t on
  `classifier.eval_split` (EMA or raw weights as `sample.use_ema` says, fixed noise and t)."""

  def __init__(self, exp: experiment_lib.Experiment):
    self.exp = exp
    self._replicated = NamedSharding(exp.mesh, P())
    self._eval = jax.jit(self._eval_sums, out_shardings=self._replicated)

  def train_step(self):
    exp = self.exp
    return _jit_step(exp, functools.partial(
        classifier_train_step, apply_fn=exp.model.apply, diffusion=exp.diffusion, tx=exp.tx,
        base_key=_base_key(exp), ema_decay=exp.config.train.ema_decay,
        grad_accum_steps=exp.config.train.grad_accum_steps))

  def _eval_sums(self, params, batch, index):
    """[4, 4] sums per quarter of t: example count, loss, top-1 and top-5 hits; t and noise fixed by the index."""
    key = jax.random.fold_in(jax.random.key(self.exp.config.seed), index)
    t_key, noise_key = jax.random.split(key)
    x0 = batch["image"]
    t = jax.random.randint(t_key, x0.shape[:1], 0, self.exp.diffusion.num_timesteps)
    x_t = self.exp.diffusion.q_sample(x0, t, jax.random.normal(noise_key, x0.shape, jnp.float32))
    out = classifier_outputs(self.exp.model.apply({"params": params}, x_t, t, train=False), batch["label"])
    quarter = jax.nn.one_hot((4 * t) // self.exp.diffusion.num_timesteps, 4)  # [B, 4]
    per_example = jnp.stack([jnp.ones_like(out["loss"]), out["loss"], out["accuracy"], out["accuracy_top5"]], -1)
    return quarter.T @ per_example

  def evaluate(self, params) -> dict:
    """Loss and accuracies on `classifier.eval_split`, overall and per quarter of t ({} without a split)."""
    c = self.exp.config.classifier
    if not c.eval_split:
      return {}
    data = input_batches(self.exp, 0, split=c.eval_split, augment=False)
    sums = 0.0
    for i in range(c.eval_batches):
      index = mesh_lib.host_to_mesh(np.uint32(1_000_003 + i), self._replicated, process_local=False)
      sums = sums + np.asarray(self._eval(params, self.exp.shard_batch(next(data)), index))
    result = {"examples": int(sums[:, 0].sum())}
    for k, name in enumerate(("loss", "accuracy", "accuracy_top5"), start=1):
      result[name] = float(sums[:, k].sum() / sums[:, 0].sum())
      for q in range(4):
        result[f"{name}_q{q}"] = float(sums[q, k] / sums[q, 0]) if sums[q, 0] else float("nan")
    return result

  def show(self, state, workdir: str, step: int, writer) -> dict:
    params = state.ema_params if self.exp.config.sample.use_ema else state.params
    result = self.evaluate(params)
    if not result:
      return {}
    if writer:
      for name, value in result.items():
        writer.add_scalar(f"eval/{name}", value, step)
    logging.info("Held-out %s at step %d: loss %.4f, accuracy %.3f (by quarter of t, low to high noise: %s)",
                 self.exp.config.classifier.eval_split, step, result["loss"], result["accuracy"],
                 ", ".join(f"{result[f'accuracy_q{q}']:.3f}" for q in range(4)))
    path = os.path.join(workdir, "evaluation", f"classifier_step{step:07d}.json")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return {"evaluation": result, "evaluation_file": path}


class AutoencoderJob:
  """The first stage of latent diffusion: autoencoder and patch-GAN in one step (train/autoencoder.py). Shows inputs
  beside their reconstructions, PSNR/SSIM on `autoencoder.eval_split`, and measures the latent scale factor
  (1 / std of the latents over `autoencoder.scale_batches` training batches, LDM's scale_by_std) into
  `latent_scale.json`, which the latent diffusion stage reads with the weights."""

  def __init__(self, exp: experiment_lib.Experiment):
    self.exp = exp
    self._replicated = NamedSharding(exp.mesh, P())
    self._outputs = jax.jit(self._outputs_fn, out_shardings=self._replicated)
    self._latent_sums = jax.jit(self._latent_sums_fn, out_shardings=self._replicated)

  def _perceptual(self):
    """(LPIPS as a function of (params, x, y), its params on the mesh), or (None, None) when its weight is 0."""
    al = self.exp.config.autoencoder_loss
    if al.perceptual_weight == 0:
      return None, None
    params = mesh_lib.host_to_mesh(lpips.load_lpips_params(al.lpips_vgg, al.lpips_heads), self._replicated,
                                   process_local=False)
    module = lpips.LPIPS()
    return (lambda p, x, y: module.apply({"params": p}, x, y)), params

  def train_step(self):
    exp = self.exp
    perceptual, perceptual_params = self._perceptual()
    weights = autoencoder_train.LossWeights.from_config(exp.config)
    steps = {gan: jax.jit(functools.partial(
        autoencoder_train.train_step, model=exp.model, discriminator=exp.discriminator, perceptual=perceptual,
        tx=exp.tx, disc_tx=exp.disc_tx, base_key=_base_key(exp), ema_decay=exp.config.train.ema_decay,
        weights=weights, gan=gan),
        donate_argnums=0, in_shardings=(exp.state_sharding, exp.batch_sharding, self._replicated),
        out_shardings=(exp.state_sharding, None)) for gan in (False, True)}

    def step(state, batch):
      # Reading the step waits for the previous one; the next batch is already loaded by then.
      return steps[int(state.step) >= weights.disc_start](state, batch, perceptual_params)
    return step

  def _outputs_fn(self, params, batch):
    return autoencoder_train.quality(self.exp.model, params, batch["image"])

  def _latent_sums_fn(self, params, batch, index):
    z = autoencoder_train.latents(self.exp.model, params, batch["image"],
                                  jax.random.fold_in(jax.random.key(self.exp.config.seed), index))
    z = z.astype(jnp.float32)
    return jnp.stack([jnp.float32(z.size), jnp.sum(z), jnp.sum(jnp.square(z))])

  def evaluate(self, params) -> tuple[dict, dict]:
    """(PSNR/SSIM means on the evaluation split, the first batch's inputs and reconstructions)."""
    a = self.exp.config.autoencoder
    data = input_batches(self.exp, 0, split=a.eval_split or None, augment=False)
    psnr, ssim, first = [], [], None
    for _ in range(a.eval_batches):
      out = jax.device_get(self._outputs(params, self.exp.shard_batch(next(data))))
      psnr.append(out["psnr"])
      ssim.append(out["ssim"])
      first = out if first is None else first
    psnr = np.concatenate(psnr)
    return {"examples": int(len(psnr)), **autoencoder_train.mean_psnr(psnr),
            "ssim": float(np.concatenate(ssim).mean())}, first

  def latent_scale(self, params) -> dict:
    """The std of the latents over `autoencoder.scale_batches` training batches, and 1 / std."""
    a = self.exp.config.autoencoder
    data = input_batches(self.exp, 0, augment=False)
    sums = np.zeros(3, np.float64)
    for i in range(a.scale_batches):
      index = mesh_lib.host_to_mesh(np.uint32(2_000_003 + i), self._replicated, process_local=False)
      sums += np.asarray(self._latent_sums(params, self.exp.shard_batch(next(data)), index), np.float64)
    count, total, squares = sums
    std = float(np.sqrt(max(squares / count - (total / count) ** 2, 0.0) * count / max(count - 1, 1)))
    return {"latent_std": std, "scale_factor": 1.0 / std if std > 0 else float("inf"),
            "latent_mean": float(total / count), "batches": a.scale_batches}

  def show(self, state, workdir: str, step: int, writer) -> dict:
    params = state.ema_params if self.exp.config.sample.use_ema else state.params
    result, first = self.evaluate(params)
    scale = {"step": step, "kind": self.exp.config.autoencoder.kind, **self.latent_scale(params)}
    if writer:
      for name in ("psnr", "ssim"):
        writer.add_scalar(f"eval/{name}", result[name], step)
      writer.add_scalar("eval/latent_std", scale["latent_std"], step)
    logging.info("Step %d: held-out PSNR %.2f dB, SSIM %.4f over %d images; latent std %.4f (scale factor %.5f).",
                 step, result["psnr"], result["ssim"], result["examples"], scale["latent_std"],
                 scale["scale_factor"])
    n = min(self.exp.config.train.num_grid_samples, len(first["input"]))
    pairs = np.concatenate([first["input"][:n], first["reconstruction"][:n]], axis=2)  # input | reconstruction
    grid = os.path.join(workdir, "samples", f"reconstructions_step{step:07d}.png")
    evaluation_file = os.path.join(workdir, "evaluation", f"autoencoder_step{step:07d}.json")
    scale_file = os.path.join(workdir, LATENT_SCALE_FILE)
    if jax.process_index() == 0:
      sampling.save_grid(np.asarray(sampling.to_uint8(pairs)), grid)
      os.makedirs(os.path.dirname(evaluation_file), exist_ok=True)
      with open(evaluation_file, "w") as f:
        json.dump(result, f, indent=2)
      with open(scale_file + ".tmp", "w") as f:
        json.dump(scale, f, indent=2)
      os.replace(scale_file + ".tmp", scale_file)  # a reader never sees half a file
    return {"grid": grid, "evaluation": result, "evaluation_file": evaluation_file, "latent_scale": scale,
            "latent_scale_file": scale_file}


JOBS = {"diffusion": DiffusionJob, "classifier": ClassifierJob, "autoencoder": AutoencoderJob,
        "latent_diffusion": LatentDiffusionJob}


def for_experiment(exp: experiment_lib.Experiment):
  return JOBS[exp.network](exp)
