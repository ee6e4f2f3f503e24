"""Checkpoints of the train state with orbax, plus the model description they belong to.

Each step folder holds `state` (the TrainState) and `meta` (JSON: the config sections that fix the parameter shapes).
A workdir whose checkpoint describes a different model is refused before anything is written, so a mistyped
--workdir never overwrites someone's run.
"""

import hashlib
import json
import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxdiff.errors import CheckpointError

# Config entries that fix the shapes of the parameters: a checkpoint only fits a config that agrees on all of them.
SHAPE_KEYS = ("model", "data.image_size", "data.channels", "diffusion.var_type", "diffusion.num_timesteps",
              "num_classes")


def state_layout(abstract_state) -> str:
  """A digest of every leaf's path, shape and dtype: catches any incompatible state, e.g. other optimizer options."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  text = ";".join(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}" for path, leaf in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_signature(config, num_classes: int, abstract_state) -> dict:
  """The parts of a config a checkpoint must agree with, as plain JSON values, plus the state's layout."""
  full = json.loads(config.to_json_best_effort())
  signature = {}
  for key in SHAPE_KEYS:
    if key == "num_classes":
      signature[key] = num_classes
      continue
    value = full
    for part in key.split("."):
      value = value[part]
    signature[key] = value
  # These change no parameter shape: a checkpoint may be reused across them.
  for free in ("dtype", "remat", "dropout", "init_from"):
    signature["model"].pop(free, None)
  signature["state_layout"] = state_layout(abstract_state)
  return signature


def _describe_mismatch(saved: dict, current: dict) -> str:
  diffs = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += [f"{key}.{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} in the config"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif a != b and key != "state_layout":
      diffs.append(f"{key}: {a!r} in the checkpoint, {b!r} in the config")
  if not diffs:  # only the layout differs: an option that changes the optimizer state, such as train.grad_clip
    diffs.append("the train state's layout differs: check the train.* options that shape the optimizer state")
  return "; ".join(diffs[:3])


class Checkpointer:
  """Saves every N steps (async) and restores the newest readable step, refusing other models' checkpoints."""

  def __init__(self, directory: str, *, signature: dict, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.signature = signature
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=True))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def check_compatible(self):
    """Raises CheckpointError when the workdir holds a checkpoint of a different model."""
    for step in reversed(self.all_steps()):
      try:
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception:  # An unreadable step says nothing about the model; restore() skips it.
        continue
      if saved != self.signature:
        raise CheckpointError(
            f"{self.directory} holds a checkpoint of a different model ({_describe_mismatch(saved, self.signature)})"
            ": pass a new --workdir, or the config that checkpoint was trained with.")
      return

  def restore(self, abstract_state):
    """The newest step that restores cleanly, or None when there is none.

    An unreadable step (truncated or missing files, no metadata, an empty folder) is moved aside to
    `<checkpoints>_unreadable/` with a warning, so nothing is deleted and a resumed run can save that step again.
    """
    self.check_compatible()
    for step in reversed(self.all_steps()):
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]
      except Exception as e:  # orbax raises ValueError/KeyError/OSError/... on damaged steps.
        self._set_aside(step, e)
    return None

  def _set_aside(self, step: int, error: Exception):
    aside = os.path.join(f"{self.directory}_unreadable", f"{step}-{int(time.time())}")
    logging.warning("Checkpoint step %d in %s is unreadable (%s: %s); moved it to %s and trying an older one.",
                    step, self.directory, type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "",
                    aside)
    if jax.process_index() == 0:  # the checkpoint directory is shared by all processes
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), aside)
    multihost_utils.sync_global_devices(f"jaxdiff_set_aside_{step}")
    self.manager.reload()

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Starts an async save; errors of this or the previous save surface here, as a CheckpointError."""
    try:
      return self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(self.signature)),
          force=force)
    except Exception as e:
      raise self._save_error(step, e) from e

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(None, e) from e

  def _save_error(self, step, error: Exception) -> CheckpointError:
    kept = [s for s in self.all_steps() if s != step]
    return CheckpointError(
        f"Saving checkpoint{'' if step is None else f' step {step}'} to {self.directory} failed "
        f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); the earlier "
        f"checkpoint (step {kept[-1] if kept else 'none'}) is intact: free disk space or fix the path, then resume.")

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()
