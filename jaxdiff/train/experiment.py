"""Turns a config into the pieces a run needs: model, diffusion, optimizer, mesh and shardings."""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from jaxdiff import data as data_lib
from jaxdiff import models
from jaxdiff.diffusion import GaussianDiffusion, create_diffusion
from jaxdiff.errors import CheckpointError, ConfigError
from jaxdiff.train import checkpoint as checkpoint_lib
from jaxdiff.train import mesh as mesh_lib
from jaxdiff.train.state import TrainState, create_state, make_optimizer


@dataclasses.dataclass
class Experiment:
  config: Any
  model: Any
  diffusion: GaussianDiffusion
  tx: optax.GradientTransformation
  num_classes: int  # 0 when the model is unconditional
  mesh: jax.sharding.Mesh
  state_sharding: Any = None

  @property
  def sample_shape(self) -> tuple[int, int, int]:
    d = self.config.data
    return (d.image_size, d.image_size, d.channels)

  @property
  def batch_sharding(self) -> NamedSharding:
    return mesh_lib.batch_sharding(self.mesh)

  def checkpointer(self, workdir: str) -> checkpoint_lib.Checkpointer:
    return checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        signature=checkpoint_lib.model_signature(self.config, self.num_classes, self.abstract_state()),
        max_to_keep=self.config.train.keep_checkpoints)

  def _init(self, key: jax.Array) -> TrainState:
    x = jnp.zeros((1, *self.sample_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    params = self.model.init(key, x, t, y, train=False)["params"]
    return create_state(params, self.tx, num_timesteps=self.diffusion.num_timesteps)

  def abstract_state(self) -> TrainState:
    return jax.eval_shape(self._init, jax.random.key(0))

  def init_state(self, key: jax.Array) -> TrainState:
    """A fresh state, created on the devices by one jitted program (no full host-side copy)."""
    return jax.jit(self._init, out_shardings=self.state_sharding)(key)

  def abstract_state_with_sharding(self) -> TrainState:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        self.abstract_state(), self.state_sharding)

  def restore_params(self, workdir: str, *, use_ema: bool):
    """(params, step) of the workdir's newest checkpoint (EMA or raw)."""
    checkpointer = self.checkpointer(workdir)
    state = checkpointer.restore(self.abstract_state_with_sharding())
    checkpointer.close()
    if state is None:
      raise CheckpointError(f"No checkpoint in {checkpointer.directory}: train first with train.py --workdir, "
                            "pass the workdir of a trained run, or set model.init_from to PyTorch weights.")
    return (state.ema_params if use_ema else state.params), int(state.step)

  def shard_batch(self, batch: dict) -> dict:
    """This process's share of the global batch, placed over the mesh's data axis."""
    return mesh_lib.host_to_mesh(batch, self.batch_sharding, process_local=True)


def _check_config(config):
  t = config.train
  n = jax.device_count()
  if t.batch_size <= 0 or t.batch_size % n:
    raise ConfigError(f"train.batch_size={t.batch_size} must be a positive multiple of the {n} devices.")
  if t.grad_accum_steps < 1 or t.batch_size % (t.grad_accum_steps * n):
    raise ConfigError(f"train.batch_size={t.batch_size} must split into train.grad_accum_steps={t.grad_accum_steps} "
                      f"micro-batches of a multiple of the {n} devices each.")
  if t.batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of the {jax.process_count()} processes.")
  if t.num_steps < 0:
    raise ConfigError(f"train.num_steps must be >= 0, got {t.num_steps}.")
  if not 0 <= t.ema_decay < 1:
    raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}.")
  for key in ("log_every", "checkpoint_every"):
    if t[key] <= 0:
      raise ConfigError(f"train.{key} must be >= 1, got {t[key]}.")
  if config.sample.per_device_batch_size <= 0:
    raise ConfigError(f"sample.per_device_batch_size must be >= 1, got {config.sample.per_device_batch_size}.")


def build(config) -> Experiment:
  """Checks the config and builds the model, diffusion, optimizer and mesh it describes."""
  _check_config(config)
  d = config.data
  num_classes = 0
  if config.model.class_conditional and config.model.num_classes > 0:
    num_classes = config.model.num_classes  # e.g. converted ImageNet weights, sampled without the dataset
  elif config.model.class_conditional:
    info = data_lib.dataset_info(d.name, data_dir=d.data_dir, image_dir=d.image_dir, split=d.split)
    if info.num_classes < 2:
      raise ConfigError(f"model.class_conditional=True needs a labelled dataset; {d.name!r} has "
                        f"{info.num_classes} classes: set --config.model.class_conditional=False.")
    num_classes = info.num_classes
  diffusion = create_diffusion(config.diffusion)
  model = models.create_model(config.model, image_size=d.image_size, in_channels=d.channels,
                              out_channels=d.channels * diffusion.output_channels_factor,
                              num_classes=num_classes or None)
  tx = make_optimizer(learning_rate=config.train.learning_rate, warmup_steps=config.train.warmup_steps,
                      grad_clip=config.train.grad_clip, skip_nonfinite=config.train.skip_nonfinite_steps)
  mesh = mesh_lib.make_mesh(config.mesh)
  exp = Experiment(config=config, model=model, diffusion=diffusion, tx=tx, num_classes=num_classes, mesh=mesh)
  exp.state_sharding = mesh_lib.state_sharding(exp.abstract_state(), mesh)
  return exp
