"""The train state and the jitted, donated train step."""

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


LR_SCHEDULES = ("constant", "cosine")


def make_optimizer(*, learning_rate: float, warmup_steps: int, grad_clip: float, skip_nonfinite: bool = False,
                   schedule: str = "constant", num_steps: int = 0) -> optax.GradientTransformation:
  """Adam with linear warmup, then a constant rate (the DDPM recipe) or a cosine decay to 0 at `num_steps`, and
  global-norm gradient clipping.

  With skip_nonfinite, a step whose gradients hold a NaN or Inf leaves the parameters and Adam's moments unchanged.
  """
  warmup = max(warmup_steps, 1)
  if schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(num_steps, warmup + 1))
  else:
    schedule = optax.linear_schedule(0.0, learning_rate, warmup)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  tx = optax.chain(*parts, optax.adam(schedule))
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


def train_step(state: TrainState, batch: dict, *, apply_fn: Callable, diffusion: GaussianDiffusion,
               tx: optax.GradientTransformation, base_key: jax.Array, ema_decay: float,
               class_conditional: bool, loss_type: LossType = LossType.MSE, vlb_weight: float = 1e-3,
               timestep_sampler: TimestepSampler = TimestepSampler.UNIFORM, grad_accum_steps: int = 1,
               min_snr_gamma: float = 0.0):
  """One optimisation step: draw t, x_t = q_sample, minimise `loss_type` (importance-weighted for a non-uniform t).

  With grad_accum_steps > 1 the batch is processed in that many micro-batches whose gradients are summed, so
  activations of only one micro-batch are alive at a time; t and the noise are drawn for the whole batch first.
  """
  key = jax.random.fold_in(base_key, state.step)
  t_key, noise_key, dropout_key = jax.random.split(key, 3)
  x0 = batch["image"]
  batch_size = x0.shape[0]
  if timestep_sampler == TimestepSampler.LOSS_SECOND_MOMENT:
    t, weights = state.loss_history.sample(t_key, batch_size)
  else:
    t, weights = jax.random.randint(t_key, (batch_size,), 0, diffusion.num_timesteps), jnp.ones((batch_size,))
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  inputs = dict(x0=x0, t=t, noise=noise, weights=weights,
                labels=batch["label"] if class_conditional else jnp.zeros((batch_size,), jnp.int32))

  def loss_fn(params, mb, dropout_key):
    x_t = diffusion.q_sample(mb["x0"], mb["t"], mb["noise"])
    labels = mb["labels"] if class_conditional else None
    out = apply_fn({"params": params}, x_t, mb["t"], labels, train=True, rngs={"dropout": dropout_key})
    losses = diffusion.training_losses(out, mb["x0"], x_t, mb["t"], mb["noise"], loss_type=loss_type,
                                       vlb_weight=vlb_weight, min_snr_gamma=min_snr_gamma)
    # Normalised by the whole batch, so summing micro-batch values gives the batch mean.
    return jnp.sum(losses.loss * mb["weights"]) / batch_size, losses

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (loss, losses), grads = grad_fn(state.params, inputs, dropout_key)
  else:
    def accumulate(carry, xs):
      mb, mb_key = xs
      (mb_loss, mb_losses), mb_grads = grad_fn(state.params, mb, mb_key)
      return jax.tree.map(jnp.add, carry, (mb_loss, mb_grads)), mb_losses

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), losses = jax.lax.scan(
        accumulate, zero, (_micro_batches(inputs, grad_accum_steps), jax.random.split(dropout_key, grad_accum_steps)))
    # Back to batch order, matching t.
    losses = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(batch_size, *a.shape[2:]), losses)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, ema_decay)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  loss_history = state.loss_history
  if timestep_sampler == TimestepSampler.LOSS_SECOND_MOMENT:
    updated = loss_history.update(t, losses.loss)
    # A non-finite (skipped) step must not poison the history.
    loss_history = jax.tree.map(lambda new, old: jnp.where(jnp.isfinite(loss), new, old), updated, loss_history)
  metrics = {"loss": loss, "mse": jnp.mean(losses.mse), "vb": jnp.mean(losses.vb),
             "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params)}
  return TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                    loss_history=loss_history), metrics
