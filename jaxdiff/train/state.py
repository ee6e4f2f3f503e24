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


def make_optimizer(*, learning_rate: float, warmup_steps: int, grad_clip: float) -> optax.GradientTransformation:
  """Adam with linear warmup to a constant rate and global-norm gradient clipping (the DDPM recipe)."""
  schedule = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  return optax.chain(*parts, optax.adam(schedule))


def create_state(params, tx: optax.GradientTransformation, *, num_timesteps: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), loss_history=LossHistory.create(num_timesteps))


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay warmed up as min(decay, (1 + step) / (10 + step)) so short runs get a useful average."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch: dict, *, apply_fn: Callable, diffusion: GaussianDiffusion,
               tx: optax.GradientTransformation, base_key: jax.Array, ema_decay: float,
               class_conditional: bool, loss_type: LossType = LossType.MSE, vlb_weight: float = 1e-3,
               timestep_sampler: TimestepSampler = TimestepSampler.UNIFORM):
  """One optimisation step: draw t, x_t = q_sample, minimise `loss_type` (importance-weighted for a non-uniform t)."""
  key = jax.random.fold_in(base_key, state.step)
  t_key, noise_key, dropout_key = jax.random.split(key, 3)
  x0 = batch["image"]
  labels = batch["label"] if class_conditional else None
  if timestep_sampler == TimestepSampler.LOSS_SECOND_MOMENT:
    t, weights = state.loss_history.sample(t_key, x0.shape[0])
  else:
    t, weights = jax.random.randint(t_key, x0.shape[:1], 0, diffusion.num_timesteps), 1.0
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  x_t = diffusion.q_sample(x0, t, noise)

  def loss_fn(params):
    out = apply_fn({"params": params}, x_t, t, labels, train=True, rngs={"dropout": dropout_key})
    losses = diffusion.training_losses(out, x0, x_t, t, noise, loss_type=loss_type, vlb_weight=vlb_weight)
    return jnp.mean(losses.loss * weights), losses

  (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, ema_decay)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  loss_history = state.loss_history
  if timestep_sampler == TimestepSampler.LOSS_SECOND_MOMENT:
    loss_history = loss_history.update(t, losses.loss)
  metrics = {"loss": loss, "mse": jnp.mean(losses.mse), "vb": jnp.mean(losses.vb),
             "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params)}
  return TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                    loss_history=loss_history), metrics
