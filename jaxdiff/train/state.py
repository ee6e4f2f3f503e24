"""The train state and the jitted, donated train step."""

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxdiff.diffusion.gaussian import GaussianDiffusion


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; the RNG of step s is fold_in(seed key, s), so no key is stored."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def make_optimizer(*, learning_rate: float, warmup_steps: int, grad_clip: float) -> optax.GradientTransformation:
  """Adam with linear warmup to a constant rate and global-norm gradient clipping (the DDPM recipe)."""
  schedule = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  return optax.chain(*parts, optax.adam(schedule))


def create_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params))


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay warmed up as min(decay, (1 + step) / (10 + step)) so short runs get a useful average."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch: dict, *, apply_fn: Callable, diffusion: GaussianDiffusion,
               tx: optax.GradientTransformation, base_key: jax.Array, ema_decay: float,
               class_conditional: bool):
  """One optimisation step on the simple loss: t ~ U{0..T-1}, x_t = q_sample, regress the target."""
  key = jax.random.fold_in(base_key, state.step)
  t_key, noise_key, dropout_key = jax.random.split(key, 3)
  x0 = batch["image"]
  labels = batch["label"] if class_conditional else None
  t = jax.random.randint(t_key, x0.shape[:1], 0, diffusion.num_timesteps)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  x_t = diffusion.q_sample(x0, t, noise)

  def loss_fn(params):
    out = apply_fn({"params": params}, x_t, t, labels, train=True, rngs={"dropout": dropout_key})
    return jnp.mean(diffusion.simple_loss(out, x0, t, noise))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, ema_decay)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params)}
  return TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state), metrics
