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
from jax.experimental.compilation_cache import compilation_cache as jax_cache
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


# Programs that compile faster than this are not written to the persistent cache. JAX's default (1 s) would skip a
# tiny CPU model's steps and evaluations, which still cost seconds together on every restart.
CACHE_MIN_COMPILE_SECONDS = 0.5
_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "writes"}


@contextlib.contextmanager
def compilation_cache(setting: str, workdir: str):
  """JAX's persistent compilation cache for one run; yields {"dir": folder or None, "hits": n, "writes": n}, counted
  while the run lasts.

  setting (train.compilation_cache_dir): a folder; "none" turns the cache off; "" is <workdir>/compilation_cache
  unless the process already has a cache folder (JAX_COMPILATION_CACHE_DIR, or one set by the caller, e.g. the
  tests' shared cache), which is kept. JAX reads its settings once, at the first compilation, so they are reset on
  entry and restored (and reset) on exit: a later run in the same process starts clean.
  """
  names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")
  before = {name: getattr(jax.config, name) for name in names}
  if setting == "none":
    wanted = {"jax_enable_compilation_cache": False}
  elif setting == "" and before["jax_compilation_cache_dir"]:
    wanted = {}
  else:
    wanted = {"jax_compilation_cache_dir": os.path.abspath(setting or os.path.join(workdir, "compilation_cache")),
              "jax_enable_compilation_cache": True,
              "jax_persistent_cache_min_compile_time_secs": min(
                  CACHE_MIN_COMPILE_SECONDS, before["jax_persistent_cache_min_compile_time_secs"])}
  changed = {name: value for name, value in wanted.items() if before[name] != value}
  for name, value in changed.items():
    jax.config.update(name, value)
  if changed:
    jax_cache.reset_cache()
  enabled = jax.config.jax_enable_compilation_cache and bool(jax.config.jax_compilation_cache_dir)
  counts = {"dir": jax.config.jax_compilation_cache_dir if enabled else None, "hits": 0, "writes": 0}
  if enabled:
    logging.info("Persistent compilation cache: %s.", counts["dir"])

  def count(event, **kwargs):
    del kwargs
    if event in _CACHE_EVENTS:
      counts[_CACHE_EVENTS[event]] += 1

  jax.monitoring.register_event_listener(count)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_listener(count)
    for name in changed:
      jax.config.update(name, before[name])
    if changed:
      jax_cache.reset_cache()


def _batch_shapes(batch) -> tuple:
  return tuple((key, tuple(value.shape)) for key, value in sorted(batch.items()))


def make_train_step(exp: experiment_lib.Experiment):
  """The job's jitted step with the state donated, the state replicated and the batch split over the data axis."""
  return jobs.for_experiment(exp).train_step()


def batches(exp: experiment_lib.Experiment, start_step: int):
  """This process's input batches from `start_step` on, in the order an uninterrupted run sees them."""
  return jobs.input_batches(exp, start_step)


def run(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns a summary of the run."""
  with compilation_cache(config.train.compilation_cache_dir, workdir) as cache:
    return _run(config, workdir, cache)


def _run(config, workdir, cache) -> dict:
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
  compile_seconds = {}  # the step's compilation time for each batch shape ("16x32x32x3": seconds)
  compiled = set()

  def train_one(state, step):
    """One step; a new batch shape (an aspect bucket's) compiles the step: timed, logged and written."""
    batch = exp.shard_batch(next(data_iter))
    shapes = _batch_shapes(batch)
    if shapes in compiled:
      return step_fn(state, batch)
    begin = time.perf_counter()
    out = step_fn(state, batch)  # jit compiles (or loads from the persistent cache) before it dispatches
    seconds = time.perf_counter() - begin
    compiled.add(shapes)
    image = batch.get("image", next(iter(batch.values())))
    name = "x".join(str(n) for n in image.shape)
    compile_seconds[name] = compile_seconds.get(name, 0.0) + seconds
    logging.info("Compiled the step for batch [%s] in %.2f s.", ", ".join(str(n) for n in image.shape), seconds)
    if writer:
      writer.add_scalar(f"compile/seconds_{name}", seconds, step)
    return out

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
        state, metrics = train_one(state, step)
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
    if writer:
      writer.add_scalar("compile/cache_hits", cache["hits"], final_step)
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
      "job": exp.network, "compile_seconds": compile_seconds, "compilation_cache_dir": cache["dir"],
      "compilation_cache_hits": cache["hits"], "compilation_cache_writes": cache["writes"], **shown,
  }
