"""The train state and the train steps of the diffusion model and the noisy classifier (jitted and donated by jobs.py)."""

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxdiff.diffusion.gaussian import GaussianDiffusion, LossType
from jaxdiff.diffusion.timesteps import LossHistory, TimestepSampler


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; the RNG of step s is fold_in(seed key, s), so no key is stored."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  loss_history: LossHistory  # read only by the loss_second_moment timestep sampler


LR_SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(*, learning_rate: float, warmup_steps: int, grad_clip: float, skip_nonfinite: bool = False,
                   schedule: str = "constant", num_steps: int = 0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
  """Adam with linear warmup, then a constant rate (the DDPM recipe), a cosine decay or a linear decay (guided-
  diffusion's anneal_lr) to 0 at `num_steps`, and global-norm gradient clipping; AdamW when weight_decay > 0.

  With skip_nonfinite, a step whose gradients hold a NaN or Inf leaves the parameters and Adam's moments unchanged.
  """
  warmup = max(warmup_steps, 1)
  if schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(num_steps, warmup + 1))
  elif schedule == "linear":
    schedule = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup),
                                     optax.linear_schedule(learning_rate, 0.0, max(num_steps - warmup, 1))], [warmup])
  else:
    schedule = optax.linear_schedule(0.0, learning_rate, warmup)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  adam = (optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay) if weight_decay else
          optax.adam(schedule, b1=b1, b2=b2))
  tx = optax.chain(*parts, adam)
  # The loop stops a run after too many skipped steps in a row, so optax's own limit is never the one that acts.
  return optax.apply_if_finite(tx, max_consecutive_errors=2 ** 30) if skip_nonfinite else tx


def create_state(params, tx: optax.GradientTransformation, *, num_timesteps: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), loss_history=LossHistory.create(num_timesteps))


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay warmed up as min(decay, (1 + step) / (10 + step)) so short runs get a useful average."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _micro_batches(tree, count: int):
  """[B, ...] -> [count, B / count, ...], micro-batch i holding examples i, i + count, ...: each device's share of
  the data-sharded batch stays spread evenly over the micro-batches."""
  return jax.tree.map(lambda a: jnp.swapaxes(a.reshape(-1, count, *a.shape[1:]), 0, 1), tree)


def _value_and_grad(loss_fn: Callable, params, inputs: dict, key: jax.Array, grad_accum_steps: int):
  """(loss, per-example aux in batch order, grads) of `loss_fn(params, inputs, key) -> (loss, aux)`, whose loss is
  normalised by the whole batch; with grad_accum_steps > 1 over that many micro-batches, one alive at a time."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (loss, aux), grads = grad_fn(params, inputs, key)
    return loss, aux, grads
  batch_size = jax.tree.leaves(inputs)[0].shape[0]

  def accumulate(carry, xs):
    mb, mb_key = xs
    (mb_loss, mb_aux), mb_grads = grad_fn(params, mb, mb_key)
    return jax.tree.map(jnp.add, carry, (mb_loss, mb_grads)), mb_aux

  zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), aux = jax.lax.scan(
      accumulate, zero, (_micro_batches(inputs, grad_accum_steps), jax.random.split(key, grad_accum_steps)))
  # Back to batch order.
  aux = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(batch_size, *a.shape[2:]), aux)
  return loss, aux, grads


def _apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation, ema_decay: float, **replace):
  """The state after one optimizer update of params and their EMA."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, ema_decay)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state, **replace)


def train_step(state: TrainState, batch: dict, *, apply_fn: Callable, diffusion: GaussianDiffusion,
               tx: optax.GradientTransformation, base_key: jax.Array, ema_decay: float,
               condition: Any = None, loss_type: LossType = LossType.MSE, vlb_weight: float = 1e-3,
               timestep_sampler: TimestepSampler = TimestepSampler.UNIFORM, grad_accum_steps: int = 1,
               min_snr_gamma: float = 0.0, cond_drop_prob: float = 0.0,
               encode: Callable[[jax.Array, jax.Array], jax.Array] | None = None):
  """One optimisation step: draw t, x_t = q_sample, minimise `loss_type` (importance-weighted for a non-uniform t).

  With grad_accum_steps > 1 the batch is processed in that many micro-batches whose gradients are summed, so
  activations of only one micro-batch are alive at a time; t and the noise are drawn for the whole batch first.
  `condition` (a conditioner of models/conditioning.py, or None) reads the raw condition from the batch; with
  cond_drop_prob > 0 each example's condition becomes its null value with that probability (classifier-free
  guidance). `encode(images, key)` maps the images to the diffused data (a frozen autoencoder's scaled latents).
  """
  key = jax.random.fold_in(base_key, state.step)
  t_key, noise_key, dropout_key = jax.random.split(key, 3)
  drop_key = jax.random.fold_in(key, 3)  # apart from the split, so runs without dropping keep their draws
  x0 = batch["image"] if encode is None else encode(batch["image"], jax.random.fold_in(key, 4))
  batch_size = x0.shape[0]
  if timestep_sampler == TimestepSampler.LOSS_SECOND_MOMENT:
    t, weights = state.loss_history.sample(t_key, batch_size)
  else:
    t, weights = jax.random.randint(t_key, (batch_size,), 0, diffusion.num_timesteps), jnp.ones((batch_size,))
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  cond = {} if condition is None else condition.from_batch(batch)
  if condition is not None:  # SDXL's micro-conditioning may drop its keys with their own probabilities
    cond = condition.drop(drop_key, cond, cond_drop_prob)
  inputs = dict(x0=x0, t=t, noise=noise, weights=weights, cond=cond)

  def loss_fn(params, mb, dropout_key):
    x_t = diffusion.q_sample(mb["x0"], mb["t"], mb["noise"])
    out = apply_fn({"params": params}, x_t, mb["t"], mb["cond"] or None, train=True, rngs={"dropout": dropout_key})
    losses = diffusion.training_losses(out, mb["x0"], x_t, mb["t"], mb["noise"], loss_type=loss_type,
                                       vlb_weight=vlb_weight, min_snr_gamma=min_snr_gamma)
    # Normalised by the whole batch, so summing micro-batch values gives the batch mean.
    return jnp.sum(losses.loss * mb["weights"]) / batch_size, losses

  loss, losses, grads = _value_and_grad(loss_fn, state.params, inputs, dropout_key, grad_accum_steps)
  loss_history = state.loss_history
  if timestep_sampler == TimestepSampler.LOSS_SECOND_MOMENT:
    updated = loss_history.update(t, losses.loss)
    # A non-finite (skipped) step must not poison the history.
    loss_history = jax.tree.map(lambda new, old: jnp.where(jnp.isfinite(loss), new, old), updated, loss_history)
  new_state = _apply_gradients(state, grads, tx, ema_decay, loss_history=loss_history)
  metrics = {"loss": loss, "mse": jnp.mean(losses.mse), "vb": jnp.mean(losses.vb),
             "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(new_state.params)}
  return new_state, metrics


def quartile_means(t: jax.Array, num_timesteps: int, **values) -> dict:
  """{name_q{k}: mean of values over the examples whose t is in the k-th quarter of [0, T)}, as guided-diffusion
  logs its classifier's loss and accuracy (NaN for an empty quarter)."""
  quarter = (4 * t) // num_timesteps
  out = {}
  for k in range(4):
    mask = (quarter == k).astype(jnp.float32)
    for name, value in values.items():
      out[f"{name}_q{k}"] = jnp.sum(mask * value) / jnp.sum(mask)
  return out


def classifier_outputs(logits: jax.Array, labels: jax.Array) -> dict:
  """Per-example cross-entropy, top-1 and top-5 hits."""
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
          "accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32),
          "accuracy_top5": jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.float32)}


def classifier_train_step(state: TrainState, batch: dict, *, apply_fn: Callable, diffusion: GaussianDiffusion,
                          tx: optax.GradientTransformation, base_key: jax.Array, ema_decay: float,
                          grad_accum_steps: int = 1):
  """One step of the noisy classifier (guided-diffusion's classifier_train): t uniform, x_t = q_sample with the
  diffusion's schedule, cross-entropy of the labels. Metrics: loss and accuracies, overall and per quarter of t."""
  key = jax.random.fold_in(base_key, state.step)
  t_key, noise_key, dropout_key = jax.random.split(key, 3)
  x0, labels = batch["image"], batch["label"]
  batch_size = x0.shape[0]
  t = jax.random.randint(t_key, (batch_size,), 0, diffusion.num_timesteps)
  inputs = dict(x_t=diffusion.q_sample(x0, t, jax.random.normal(noise_key, x0.shape, jnp.float32)), t=t,
                labels=labels)

  def loss_fn(params, mb, dropout_key):
    logits = apply_fn({"params": params}, mb["x_t"], mb["t"], train=True, rngs={"dropout": dropout_key})
    outputs = classifier_outputs(logits.astype(jnp.float32), mb["labels"])
    return jnp.sum(outputs["loss"]) / batch_size, outputs

  loss, outputs, grads = _value_and_grad(loss_fn, state.params, inputs, dropout_key, grad_accum_steps)
  new_state = _apply_gradients(state, grads, tx, ema_decay)
  metrics = {"loss": loss, "accuracy": jnp.mean(outputs["accuracy"]),
             "accuracy_top5": jnp.mean(outputs["accuracy_top5"]), "grad_norm": optax.global_norm(grads),
             "param_norm": optax.global_norm(new_state.params),
             **quartile_means(t, diffusion.num_timesteps, loss=outputs["loss"], accuracy=outputs["accuracy"])}
  return new_state, metrics
