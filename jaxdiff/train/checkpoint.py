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

from jaxdiff.errors import CheckpointError
from jaxdiff.train import mesh as mesh_lib

# Config entries that fix the shapes of the parameters: a checkpoint only fits a config that agrees on all of them.
SHAPE_KEYS = ("model", "data.image_size", "data.channels", "diffusion.var_type", "diffusion.num_timesteps",
              "num_classes")


def state_layout(abstract_state) -> str:
  """A digest of every leaf's path, shape and dtype: catches any incompatible state, e.g. other optimizer options."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  text = ";".join(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}" for path, leaf in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# Written only when true (older checkpoints lack it); compared as False when absent.
NULL_CLASS = "null class (train.cond_drop_prob > 0)"
# The same for a noisy classifier (config.job="classifier").
CLASSIFIER_SHAPE_KEYS = ("job", "classifier", "data.image_size", "data.channels", "num_classes")
# And for an autoencoder (config.job="autoencoder"): a convolutional network fits any image size.
AUTOENCODER_SHAPE_KEYS = ("job", "autoencoder", "autoencoder_loss.disc_layers", "autoencoder_loss.disc_channels",
                          "data.channels")
# And for latent diffusion: the diffusion model's entries, its conditioning, and (added by the experiment) the first
# stage it was trained on, since another autoencoder or scale factor silently changes what the UNet sees.
LATENT_SHAPE_KEYS = ("job",) + SHAPE_KEYS + ("latent.condition", "text_encoder")
SHAPE_KEYS_OF = {"diffusion": SHAPE_KEYS, "classifier": CLASSIFIER_SHAPE_KEYS, "autoencoder": AUTOENCODER_SHAPE_KEYS,
                 "latent_diffusion": LATENT_SHAPE_KEYS}
# Entries of those sections that change no parameter shape: a checkpoint may be reused across them.
FREE_KEYS = {"model": ("dtype", "remat", "dropout", "init_from"),
             "classifier": ("dropout", "eval_split", "eval_batches"),
             "autoencoder": ("scale_factor", "scale_batches", "init_from", "eval_split", "eval_batches"),
             "text_encoder": ("init_from", "tokenizer", "dtype")}


def model_signature(config, num_classes: int, abstract_state, *, network: str = "diffusion",
                    null_class: bool = False, extra: dict | None = None) -> dict:
  """The parts of a config a checkpoint must agree with, as plain JSON values, plus the state's layout.

  Keys added after the first release appear only when they hold something, so older checkpoints still match.
  """
  full = json.loads(config.to_json_best_effort())
  signature = {}
  for key in SHAPE_KEYS_OF[network]:
    if key in ("num_classes", "job"):
      signature[key] = num_classes if key == "num_classes" else network
      continue
    value = full
    for part in key.split("."):
      value = value[part]
    signature[key] = value
  for section, free_keys in FREE_KEYS.items():
    for free in free_keys:
      signature.get(section, {}).pop(free, None)
  if null_class:
    signature[NULL_CLASS] = True
  signature.update(extra or {})
  signature["state_layout"] = state_layout(abstract_state)
  return signature


def comparable(signature: dict) -> dict:
  """A signature as checkpoints are matched: the two fixed variances are one model (sample with either); a
  diffusion model without the null-class entry has none."""
  out = dict(signature)
  if "diffusion.var_type" in out:  # a diffusion model's signature
    out.setdefault(NULL_CLASS, False)
    out["diffusion.var_type"] = "learned_range" if out["diffusion.var_type"] == "learned_range" else "fixed"
  return out


def _describe_mismatch(saved: dict, current: dict) -> str:
  jobs = saved.get("job", "diffusion"), current.get("job", "diffusion")  # diffusion signatures predate the key
  if jobs[0] != jobs[1]:  # another kind of network: its sections say nothing more useful
    return f"config.job: {jobs[0]!r} in the checkpoint, {jobs[1]!r} in the config"
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


# Files every committed step holds; a step without one of them is damaged.
_REQUIRED_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA", "state/manifest.ocdbt")
_JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA")
# jaxdiff's list of a committed step's files and sizes, written once the step is complete.
MANIFEST = "jaxdiff_files.json"
# TensorStore statuses that mean a file is missing, too short or undecodable (not a transient failure).
_DAMAGE_STATUSES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS")


def _first_line(error: BaseException) -> str:
  """The error's type and first line; of a long line its start and its end (TensorStore puts the cause last)."""
  text = str(error).strip()
  if not text:
    return type(error).__name__
  line = text.splitlines()[0]
  return f"{type(error).__name__}: {line if len(line) <= 240 else line[:100] + ' ... ' + line[-135:]}"


def _error_chain(error: BaseException):
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def step_files(step_dir: str) -> dict[str, int]:
  """{relative path: size} of every file of a step folder."""
  files = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      files[os.path.relpath(path, step_dir)] = os.path.getsize(path)
  return {name: size for name, size in files.items() if name != MANIFEST and not name.startswith(f".{MANIFEST}")}


def structural_damage(step_dir: str) -> str | None:
  """What is wrong with a step folder's files (missing, unparseable or changed since the save), or None."""
  if not os.path.isdir(step_dir) or not os.listdir(step_dir):
    return "the step folder is empty"
  for name in _REQUIRED_FILES:
    if not os.path.isfile(os.path.join(step_dir, name)):
      return f"{name} is missing"
  for name in _JSON_FILES:
    try:
      with open(os.path.join(step_dir, name)) as f:
        json.load(f)
    except ValueError:
      return f"{name} is not valid JSON"
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None  # a step from before manifests, or killed before its manifest was written: nothing to compare
  current = step_files(step_dir)
  for name, size in sorted(saved.items()):
    if name not in current:
      return f"{name} is missing"
    if current[name] != size:
      return f"{name} has {current[name]} bytes, {size} when saved"
  return None


def reported_damage(error: BaseException) -> str | None:
  """The damage orbax or TensorStore reported while restoring (a missing item, a truncated or corrupt file)."""
  for e in _error_chain(error):
    text = str(e)
    if isinstance(e, json.JSONDecodeError) or (isinstance(e, KeyError) and "not found in the checkpoint" in text):
      return _first_line(e)
    if any(text.startswith(status) for status in _DAMAGE_STATUSES):
      return _first_line(e)
  return None


class Checkpointer:
  """Saves every N steps (async) and restores the newest readable step, refusing other models' checkpoints.

  A step is set aside only on evidence of damage: its files fail a structural check (missing, unparseable, or of
  other sizes than when it was saved), or orbax reports a missing item or a truncated or corrupt file. Any other
  failure to restore (an I/O error, out of memory, a wrong abstract state) is raised as one line and moves nothing.
  """

  def __init__(self, directory: str, *, signature: dict, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.aside_directory = f"{self.directory}_unreadable"
    self.signature = signature
    self._pending_step = None  # the step an asynchronous save is writing
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=True))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def saved_signature(self) -> dict | None:
    """The model description of the newest step whose description reads, or None."""
    for step in reversed(self.all_steps()):
      try:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception:  # An unreadable step says nothing about the model; restore() judges it.
        continue
    return None

  def check_compatible(self, *, weights_only: bool = False):
    """Raises CheckpointError when the workdir holds a checkpoint of a different model (with weights_only, the
    optimizer state may differ)."""
    saved = self.saved_signature()
    strip = (lambda sig: {k: v for k, v in comparable(sig).items() if k != "state_layout"}) if weights_only else (
        comparable)
    if saved is not None and strip(saved) != strip(self.signature):
      mismatch = _describe_mismatch(strip(saved), strip(self.signature))
      raise CheckpointError(
          f"{self.directory} holds a checkpoint of a different model ({mismatch})"
          ": pass a new --workdir, or the config that checkpoint was trained with.")

  def restore_weights(self, abstract_state):
    """(params, ema_params, step) of the newest step, read without the optimizer state (which another job's
    optimizer settings need not match), or None. Read-only: a failure raises CheckpointError and moves nothing."""
    self.check_compatible(weights_only=True)
    steps = self.all_steps()
    if not steps:
      return None
    item = {"params": abstract_state.params, "ema_params": abstract_state.ema_params, "step": abstract_state.step}
    try:
      restored = self.manager.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"Could not read the weights of checkpoint step {steps[-1]} in {self.directory} "
                            f"({_first_line(e)}): check that it holds a finished run's checkpoint.") from e
    return restored["params"], restored["ema_params"], int(restored["step"])

  def restore(self, abstract_state):
    """The newest step that restores, or None when there is no checkpoint at all.

    A damaged step is moved aside to `<checkpoints>_unreadable/` with a warning (nothing is deleted) and the next
    older one is tried. Raises CheckpointError when a step fails without evidence of damage, and when steps were
    set aside (now or by an earlier run) but none is left: a run never starts again from step 0 silently.
    """
    self.check_compatible()
    for step in reversed(self.all_steps()):
      # Checked first too: orbax restores some truncated files without a word.
      damage = structural_damage(self.step_dir(step))
      if damage is not None:
        self._set_aside(step, damage)
        continue
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]
      except Exception as e:  # pylint: disable=broad-except
        damage = structural_damage(self.step_dir(step)) or reported_damage(e)
        if damage is None:
          raise CheckpointError(
              f"Could not restore checkpoint step {step} in {self.directory} ({_first_line(e)}), though its files "
              "look intact; nothing was moved: fix the cause (disk, memory, mesh) and rerun.") from e
        self._set_aside(step, damage)
    if os.path.isdir(self.aside_directory) and os.listdir(self.aside_directory):
      raise CheckpointError(
          f"No readable checkpoint is left in {self.directory}; the damaged ones are in {self.aside_directory}. "
          f"To start again from step 0, move {self.aside_directory} away and rerun.")
    return None

  def _set_aside(self, step: int, damage: str):
    aside = os.path.join(self.aside_directory, f"{step}-{int(time.time())}")
    logging.warning("Checkpoint step %d in %s is unreadable (%s); moved it to %s and trying an older one.",
                    step, self.directory, damage, aside)
    if jax.process_index() == 0:  # the checkpoint directory is shared by all processes
      os.makedirs(self.aside_directory, exist_ok=True)
      shutil.move(self.step_dir(step), aside)
    mesh_lib.barrier(f"jaxdiff_set_aside_{step}")
    self.manager.reload()

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Starts an async save. A failure of the previous save, or of starting this one, raises CheckpointError."""
    self.wait()
    try:
      saved = self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(self.signature)),
          force=force)
    except Exception as e:
      raise self._save_error(step, e) from e
    if saved:
      self._pending_step = step
    return saved

  def wait(self):
    """Waits for the pending save; raises CheckpointError naming its step if it failed."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:
      raise self._save_error(self._pending_step, e) from e
    if self._pending_step is not None and jax.process_index() == 0:
      self._write_manifest(self._pending_step)
    self._pending_step = None

  def _write_manifest(self, step: int):
    step_dir = self.step_dir(step)
    if not os.path.isdir(step_dir):  # already removed by max_to_keep
      return
    tmp = os.path.join(step_dir, f".{MANIFEST}.tmp")
    with open(tmp, "w") as f:
      json.dump(step_files(step_dir), f)
    os.replace(tmp, os.path.join(step_dir, MANIFEST))

  def _save_error(self, step, error: Exception) -> CheckpointError:
    self.manager.reload()
    intact = [s for s in self.all_steps() if s != step and structural_damage(self.step_dir(s)) is None]
    return CheckpointError(
        f"Saving checkpoint{'' if step is None else f' step {step}'} to {self.directory} failed "
        f"({_first_line(error)}); the newest intact checkpoint is step {intact[-1] if intact else 'none'}: "
        "free disk space or fix the path, then resume.")

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def saved_run(workdir: str, *, job: str, key: str) -> dict:
  """The saved signature of the `config.job=job` run in `workdir`, which the config key `key` points at; one-line
  errors when there is no checkpoint or it is another job's."""
  directory = os.path.join(workdir, "checkpoints")
  saved = None
  if os.path.isdir(directory):  # checked first: the checkpointer would create the folder
    reader = Checkpointer(directory, signature={})
    saved = reader.saved_signature()
    reader.close()
  if saved is None:
    raise CheckpointError(f"No {job} checkpoint in {os.path.abspath(directory)}: train one with train.py "
                          f"--config.job={job} --workdir=<dir>, then pass that dir as {key}.")
  if saved.get("job", "diffusion") != job:
    raise CheckpointError(f"{workdir} holds a config.job={saved.get('job', 'diffusion')!r} run, not a "
                          f"config.job={job!r} one: pass the workdir of a run trained with --config.job={job} as {key}.")
  return saved
