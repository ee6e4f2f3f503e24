"""The training loop: `run(config, workdir)` trains any job (jobs.py), checkpoints, resumes, logs and shows what the
job draws (sample grids, held-out accuracy). It knows no job by name."""

import contextlib
import logging
import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from jaxdiff.errors import UserError
from jaxdiff.progress import progress_bar
from jaxdiff.train import experiment as experiment_lib
from jaxdiff.train import jobs


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
  """The job's jitted step with the state donated, the state replicated and the batch split over the data axis."""
  return jobs.for_experiment(exp).train_step()


def batches(exp: experiment_lib.Experiment, start_step: int):
  """This process's input batches from `start_step` on, in the order an uninterrupted run sees them."""
  return jobs.input_batches(exp, start_step)


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

  job = jobs.for_experiment(exp)
  step_fn = job.train_step()
  is_main = jax.process_index() == 0
  writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if is_main else None
  shown = {}  # what the job showed last, and at which step
  shown_step = None
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
          shown, shown_step = job.show(state, workdir, step, writer), step
      if pending is not None:
        report(*pending)
    final_step = int(state.step)
    if last_saved != final_step:
      checkpointer.save(final_step, state, force=True)
    if not preempted and shown_step != final_step:
      shown = job.show(state, workdir, final_step, writer)
  finally:
    checkpointer.close()
    if writer:
      writer.close()
  seconds = time.time() - start_time
  steps_run = final_step - start_step
  return {
      "step": final_step, "resumed_from": start_step if resumed else None, "steps_run": steps_run,
      "seconds": seconds, "steps_per_second": steps_run / seconds if seconds else 0.0,
      "final_loss": last_loss, "num_params": num_params, "grid": None, "preempted": preempted,
      "checkpoints": checkpointer.directory, "tensorboard": os.path.join(os.path.abspath(workdir), "tensorboard"),
      "job": exp.network, **shown,
  }
