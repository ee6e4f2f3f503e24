"""The training job: `run(config, workdir)` trains, checkpoints, resumes, logs and draws sample grids."""

import contextlib
import functools
import logging
import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from jaxdiff import data as data_lib
from jaxdiff import sampling
from jaxdiff.diffusion import parse_loss, parse_timestep_sampler
from jaxdiff.errors import UserError
from jaxdiff.progress import progress_bar
from jaxdiff.train import experiment as experiment_lib
from jaxdiff.train.state import train_step


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


@contextlib.contextmanager
def preemption_notice():
  """Yields `reached(step)`: True at the step where every process should save and stop after a SIGTERM.

  A single process installs its own SIGTERM handler; a multi-process run uses JAX's preemption sync service (which
  jax.distributed sets up for SIGTERM), so that every process stops at the same step.
  """
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    yield lambda step: bool(received)
  finally:
    signal.signal(signal.SIGTERM, previous)


def make_train_step(exp: experiment_lib.Experiment):
  """The jitted step with the state donated, the state replicated and the batch split over the data axis."""
  step = functools.partial(
      train_step, apply_fn=exp.model.apply, diffusion=exp.diffusion, tx=exp.tx,
      base_key=jax.random.fold_in(jax.random.key(exp.config.seed), 1), ema_decay=exp.config.train.ema_decay,
      class_conditional=bool(exp.num_classes),
      loss_type=parse_loss(exp.config.diffusion.loss, exp.diffusion.var_type),
      vlb_weight=exp.config.diffusion.vlb_weight, min_snr_gamma=exp.config.diffusion.min_snr_gamma,
      timestep_sampler=parse_timestep_sampler(exp.config.train.timestep_sampler),
      grad_accum_steps=exp.config.train.grad_accum_steps)
  return jax.jit(step, donate_argnums=0, in_shardings=(exp.state_sharding, exp.batch_sharding),
                 out_shardings=(exp.state_sharding, None))


def batches(exp: experiment_lib.Experiment, start_step: int):
  """This process's input batches from `start_step` on, in the order an uninterrupted run sees them."""
  d = exp.config.data
  return data_lib.train_batches(
      name=d.name, data_dir=d.data_dir, image_dir=d.image_dir, split=d.split, image_size=d.image_size,
      channels=d.channels, batch_size=exp.config.train.batch_size // jax.process_count(), seed=exp.config.seed,
      random_flip=d.random_flip, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())


def _write_grid(exp, sample_fn, params, workdir: str, step: int) -> str:
  """Draws the EMA grid on every device; process 0 writes it."""
  n = exp.config.train.num_grid_samples
  count = -(-n // jax.device_count()) * jax.device_count()
  images, _ = sampling.draw_indices(exp, sample_fn, params, seed=exp.config.sample.seed,
                                    indices=sampling.pad_to(np.arange(n), count))
  path = os.path.join(workdir, "samples", f"train_grid_step{step:07d}.png")
  if jax.process_index() == 0:
    sampling.save_grid(images[:n], path)
  return path


def run(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns a summary of the run."""
  exp = experiment_lib.build(config, job="train")
  checkpointer = exp.checkpointer(workdir)
  state = checkpointer.restore(exp.abstract_state_with_sharding())
  resumed = state is not None
  if state is None:
    state = exp.init_state(jax.random.fold_in(jax.random.key(config.seed), 0))
  start_step = int(state.step)
  num_steps = config.train.num_steps
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  logging.info("%s at step %d of %d; %.2fM parameters; %d devices.",
               "Resumed" if resumed else "Starting", start_step, num_steps, num_params / 1e6, jax.device_count())

  step_fn = make_train_step(exp)
  sample_fn = sampling.make_sample_fn(exp, clip_denoised=config.sample.clip_denoised)
  is_main = jax.process_index() == 0
  writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if is_main else None
  grids = []
  last_loss = float("nan")
  start_time = time.time()
  data_iter = batches(exp, start_step)
  # Each step's metrics are read after the next step is dispatched: the device never idles, at most one step is in
  # flight (many un-awaited collective steps can stall CPU backends), and a NaN is caught at the step it happened.
  pending = None

  consecutive_skips = 0

  def report(step, metrics):
    nonlocal last_loss, consecutive_skips
    metrics = jax.device_get(metrics)
    last_loss = float(metrics["loss"])
    finite = np.isfinite(last_loss)
    consecutive_skips = 0 if finite else consecutive_skips + 1
    if not finite and config.train.skip_nonfinite_steps:
      logging.warning("Loss %s at step %d: the update was skipped (%d in a row).", last_loss, step,
                      consecutive_skips)
    if not finite and (not config.train.skip_nonfinite_steps
                       or consecutive_skips > config.train.max_consecutive_skips):
      saved = checkpointer.all_steps()
      raise TrainingDiverged(
          f"The loss became {last_loss} at step {step}; the last checkpoint (step {saved[-1] if saved else 'none'})"
          " is untouched: lower train.learning_rate or raise train.warmup_steps and resume.")
    if step % config.train.log_every == 0 or step == num_steps:
      bar.set_postfix(loss=f"{last_loss:.4f}")
      if writer:
        for name, value in metrics.items():
          writer.add_scalar(f"train/{name}", float(value), step)
        writer.add_scalar("train/steps_per_second", bar.format_dict["rate"] or 0.0, step)

  preempted = False
  last_saved = start_step if resumed else None
  try:
    with progress_bar(total=num_steps, initial=start_step, desc="training", unit="step",
                      disable=not is_main) as bar, preemption_notice() as preemption_reached:
      for step in range(start_step + 1, num_steps + 1):
        state, metrics = step_fn(state, exp.shard_batch(next(data_iter)))
        if pending is not None:
          report(*pending)
        pending = (step, metrics)
        bar.update(1)
        preempted = preemption_reached(step)
        if preempted or step % config.train.checkpoint_every == 0:
          report(*pending)
          pending = None
          checkpointer.save(step, state, force=preempted)
          last_saved = step
        if preempted:
          logging.warning("Preempted (SIGTERM): saved step %d; rerun the same command to resume.", step)
          break
        if config.train.sample_every and step % config.train.sample_every == 0:
          grids.append(_write_grid(exp, sample_fn, state.ema_params, workdir, step))
      if pending is not None:
        report(*pending)
    final_step = int(state.step)
    if last_saved != final_step:
      checkpointer.save(final_step, state, force=True)
    if not preempted and (not grids or not grids[-1].endswith(f"{final_step:07d}.png")):
      grids.append(_write_grid(exp, sample_fn, state.ema_params, workdir, final_step))
  finally:
    checkpointer.close()
    if writer:
      writer.close()
  seconds = time.time() - start_time
  steps_run = final_step - start_step
  return {
      "step": final_step, "resumed_from": start_step if resumed else None, "steps_run": steps_run,
      "seconds": seconds, "steps_per_second": steps_run / seconds if seconds else 0.0,
      "final_loss": last_loss, "num_params": num_params, "grid": grids[-1] if grids else None, "preempted": preempted,
      "checkpoints": checkpointer.directory, "tensorboard": os.path.join(os.path.abspath(workdir), "tensorboard"),
  }
