"""Turns a config into the pieces a run needs: model, diffusion, optimizer, mesh and shardings."""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from jaxdiff import config_schema
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
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):  # checked before the checkpointer, which would create the folder
      raise CheckpointError(f"No checkpoint in {os.path.abspath(directory)}: train first with train.py --workdir, "
                            "pass the workdir of a trained run, or set model.init_from to PyTorch weights.")
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


def build(config, *, job: str | None = None) -> Experiment:
  """Checks the config (for `job` on these devices) and builds the model, diffusion, optimizer and mesh."""
  config_schema.validate(config)
  config_schema.validate_for_devices(config, job=job)
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
                      grad_clip=config.train.grad_clip, skip_nonfinite=config.train.skip_nonfinite_steps,
                      schedule=config.train.lr_schedule, num_steps=config.train.num_steps)
  mesh = mesh_lib.make_mesh(config.mesh)
  exp = Experiment(config=config, model=model, diffusion=diffusion, tx=tx, num_classes=num_classes, mesh=mesh)
  exp.state_sharding = mesh_lib.state_sharding(exp.abstract_state(), mesh)
  return exp
