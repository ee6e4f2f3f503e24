"""Turns a config into the pieces a run needs: network, diffusion, optimizer, mesh and shardings.

`config.job` picks the network: the diffusion UNet, the noisy classifier of classifier guidance (which trains on
the same diffusion's x_t), or the autoencoder of latent diffusion (with its discriminator and second optimizer).
Sampling with classifier guidance builds both the UNet and the classifier from one config.
"""

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding

from jaxdiff import config_schema
from jaxdiff import data as data_lib
from jaxdiff import models
from jaxdiff.models import autoencoder, conditioning, discriminator
from jaxdiff.diffusion import GaussianDiffusion, create_diffusion
from jaxdiff.errors import CheckpointError, ConfigError
from jaxdiff.train import checkpoint as checkpoint_lib
from jaxdiff.train import autoencoder as autoencoder_train
from jaxdiff.train import latent as latent_lib
from jaxdiff.train import mesh as mesh_lib
from jaxdiff.train.state import TrainState, create_state, make_optimizer


@dataclasses.dataclass
class Experiment:
  config: Any
  model: Any
  diffusion: GaussianDiffusion
  tx: optax.GradientTransformation
  num_classes: int  # 0 when the model is unconditional; a classifier's class count
  mesh: jax.sharding.Mesh
  state_sharding: Any = None
  network: str = "diffusion"  # config.job's network: diffusion | classifier | autoencoder
  null_class: bool = False  # the label table has a learned null class (index num_classes) for guidance
  # key -> a fresh train state; None: the TrainState of `model` and `tx` (diffusion and classifier)
  make_state: Callable[[jax.Array], Any] | None = None
  discriminator: Any = None  # the autoencoder's patch-GAN, and its optimizer
  disc_tx: optax.GradientTransformation | None = None
  # abstract params -> host params a fresh run starts from (imported PyTorch weights); None: the initialisation
  initial_params: Callable[[Any], Any] | None = None
  condition: Any = None  # the conditioner of models/conditioning.py that reads a batch's raw condition, or None
  first_stage: Any = None  # latent diffusion: the frozen autoencoder (train/latent.py FirstStage)
  tokenizer: Any = None  # a text-conditioned model's tokenizer
  # () -> host dict of the frozen weights a latent job reads: 'autoencoder', and 'embedder' when not trained
  frozen_loader: Callable[[], dict] | None = None
  _frozen: Any = None

  @property
  def sample_shape(self) -> tuple[int, int, int]:
    """The shape of one sampled image: sample.height x sample.width (0: data.image_size)."""
    d = self.config.data
    s = self.config.sample
    return (s.height or d.image_size, s.width or d.image_size, d.channels)

  @property
  def diffusion_shape(self) -> tuple[int, int, int]:
    """The shape of one sampled example the diffusion runs on: an image, or its latents."""
    if self.first_stage is None:
      return self.sample_shape
    height, width, _ = self.sample_shape
    f = self.first_stage.factor
    if height % f or width % f:
      raise ConfigError(f"sample.height/width {height}x{width} must be multiples of {f}, the autoencoder's factor.")
    return (height // f, width // f, self.first_stage.latent_channels)

  def frozen_params(self) -> dict:
    """The frozen weights (autoencoder, frozen embedder), replicated over the mesh, loaded once."""
    if self._frozen is None:
      host = self.frozen_loader() if self.frozen_loader else {}
      self._frozen = mesh_lib.host_to_mesh(host, NamedSharding(self.mesh, jax.sharding.PartitionSpec()),
                                           process_local=False)
    return self._frozen

  @property
  def batch_sharding(self) -> NamedSharding:
    return mesh_lib.batch_sharding(self.mesh)

  def checkpointer(self, workdir: str) -> checkpoint_lib.Checkpointer:
    return checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        signature=checkpoint_lib.model_signature(
            self.config, self.num_classes, self.abstract_state(), network=self.network, null_class=self.null_class,
            extra=None if self.first_stage is None else {"first_stage": self.first_stage.signature()}),
        max_to_keep=self.config.train.keep_checkpoints)

  def _init(self, key: jax.Array) -> TrainState:
    if self.make_state is not None:
      return self.make_state(key)
    inputs = models.dummy_inputs(self.model, self.config.data.image_size, self.config.data.channels,
                                 self.num_classes or None)
    params = self.model.init(key, *inputs, train=False)["params"]
    return create_state(params, self.tx, num_timesteps=self.diffusion.num_timesteps)

  def abstract_state(self) -> TrainState:
    return jax.eval_shape(self._init, jax.random.key(0))

  def init_state(self, key: jax.Array) -> TrainState:
    """A fresh state, created on the devices by one jitted program (no full host-side copy)."""
    state = jax.jit(self._init, out_shardings=self.state_sharding)(key)
    if self.initial_params is not None:
      # The imported weights: all params, or some top-level entries of them (a ConditionedUNet's 'unet').
      weights = self.initial_params(self.abstract_state().params)
      part = set(weights) < set(state.params)
      shardings = {k: self.state_sharding.params[k] for k in weights} if part else self.state_sharding.params
      put = lambda: mesh_lib.host_to_mesh(weights, shardings, process_local=False)
      state = state.replace(params={**state.params, **put()} if part else put(),
                            ema_params={**state.ema_params, **put()} if part else put())  # the step donates both
    return state

  def abstract_state_with_sharding(self) -> TrainState:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        self.abstract_state(), self.state_sharding)

  def restore_params(self, workdir: str, *, use_ema: bool, weights_only: bool = False):
    """(params, step) of the workdir's newest checkpoint (EMA or raw); weights_only reads no optimizer state, for a
    network trained with other optimizer settings than this config's (a guiding classifier)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):  # checked before the checkpointer, which would create the folder
      raise CheckpointError(f"No checkpoint in {os.path.abspath(directory)}: train first with train.py --workdir, "
                            "pass the workdir of a trained run, or set model.init_from to PyTorch weights.")
    checkpointer = self.checkpointer(workdir)
    try:
      if weights_only:
        restored = checkpointer.restore_weights(self.abstract_state_with_sharding())
      else:
        state = checkpointer.restore(self.abstract_state_with_sharding())
        restored = None if state is None else (state.params, state.ema_params, int(state.step))
    finally:
      checkpointer.close()
    if restored is None:
      what = "a classifier (config.job='classifier')" if self.network == "classifier" else "first"
      raise CheckpointError(f"No checkpoint in {checkpointer.directory}: train {what} with train.py --workdir, "
                            "pass the workdir of a trained run, or set model.init_from to PyTorch weights.")
    params, ema_params, step = restored
    return (ema_params if use_ema else params), step

  def shard_batch(self, batch: dict) -> dict:
    """This process's share of the global batch, placed over the mesh's data axis."""
    return mesh_lib.host_to_mesh(batch, self.batch_sharding, process_local=True)


def label_classes(config, *, why: str) -> int:
  """The number of classes of the labels: `model.num_classes` when set (e.g. converted ImageNet weights, sampled
  without the dataset), else the dataset's; `why` names the setting that needs labels."""
  if config.model.num_classes > 0:
    return config.model.num_classes
  d = config.data
  info = data_lib.dataset_info(d.name, data_dir=d.data_dir, image_dir=d.image_dir, split=d.split)
  if info.num_classes < 2:
    raise ConfigError(f"{why} needs a labelled dataset; {d.name!r} has {info.num_classes} classes: use a labelled "
                      "dataset or set --config.model.num_classes.")
  return info.num_classes


def optimizer(config, learning_rate: float) -> optax.GradientTransformation:
  t = config.train
  return make_optimizer(learning_rate=learning_rate, warmup_steps=t.warmup_steps, grad_clip=t.grad_clip,
                        skip_nonfinite=t.skip_nonfinite_steps, schedule=t.lr_schedule, num_steps=t.num_steps,
                        weight_decay=t.weight_decay, b1=t.adam_b1, b2=t.adam_b2)


def build(config, *, job: str | None = None, network: str | None = None) -> Experiment:
  """Checks the config (for `job` on these devices) and builds the network (`config.job`'s unless `network` says
  otherwise), diffusion, optimizer and mesh."""
  config_schema.validate(config, job=job if network is None else None)
  config_schema.validate_for_devices(config, job=job)
  network = network or config.job
  d = config.data
  diffusion = create_diffusion(config.diffusion)
  null_class = False
  if network == "autoencoder":
    num_classes = 0
    model = autoencoder.create_autoencoder(config.autoencoder, channels=d.channels)
  elif network == "classifier":
    num_classes = label_classes(config, why="a classifier (config.job='classifier' or sample.classifier_scale)")
    model = models.create_classifier(config.classifier, config.model, image_size=d.image_size,
                                     num_classes=num_classes)
  elif network == "latent_diffusion":
    return _build_latent(config, diffusion)
  else:
    num_classes = 0
    if config.model.class_conditional:
      num_classes = label_classes(config, why="model.class_conditional=True")
    null_class = bool(num_classes) and config.train.cond_drop_prob > 0
    model = models.create_model(config.model, image_size=d.image_size, in_channels=d.channels,
                                out_channels=d.channels * diffusion.output_channels_factor,
                                num_classes=num_classes or None, null_class=null_class)
  tx = optimizer(config, config.train.learning_rate)
  mesh = mesh_lib.make_mesh(config.mesh)
  exp = Experiment(config=config, model=model, diffusion=diffusion, tx=tx, num_classes=num_classes, mesh=mesh,
                   network=network, null_class=null_class,
                   condition=conditioning.ClassConditioner(num_classes) if network == "diffusion" and num_classes
                   else None)
  if network == "autoencoder":
    exp.discriminator = discriminator.NLayerDiscriminator(base_channels=config.autoencoder_loss.disc_channels,
                                                          num_layers=config.autoencoder_loss.disc_layers)
    exp.disc_tx = optimizer(config, config.train.disc_learning_rate or config.train.learning_rate)
    exp.make_state = functools.partial(autoencoder_train.init_state, model=model, discriminator=exp.discriminator,
                                       tx=tx, disc_tx=exp.disc_tx,
                                       image_shape=(d.image_size, d.image_size, d.channels))
    if config.autoencoder.init_from:
      exp.initial_params = functools.partial(autoencoder_train.imported_params, config)
  exp.state_sharding = mesh_lib.state_sharding(exp.abstract_state(), mesh)
  return exp


def _build_latent(config, diffusion) -> Experiment:
  """Latent diffusion: the UNet (with its class embedder or text encoder) on the frozen first stage's latents."""
  m, lat = config.model, config.latent
  stage = latent_lib.first_stage(config)
  if config.data.image_size % stage.factor:
    raise ConfigError(f"data.image_size={config.data.image_size} must be a multiple of {stage.factor}, the "
                      "autoencoder's downsampling factor.")
  size, channels = config.data.image_size // stage.factor, stage.latent_channels
  num_classes = 0
  if lat.condition == "class" or m.class_conditional:
    num_classes = label_classes(config, why=f"latent.condition={lat.condition!r}" if lat.condition == "class"
                                else "model.class_conditional=True")
  null_class = bool(num_classes) and config.train.cond_drop_prob > 0
  unet = models.create_model(m, image_size=size, in_channels=channels,
                             out_channels=channels * diffusion.output_channels_factor,
                             num_classes=num_classes if m.class_conditional else None, null_class=null_class)
  tokenizer, embedder, frozen, output = None, None, False, ""
  text = dict(embedder_2=None, text_output_2="", pooled_output="")
  if lat.condition == "text":
    from jaxdiff.models import clip
    tokenizer = latent_lib.load_tokenizers(config)
    sections = [config.text_encoder] + ([config.text_encoder_2] if config.text_encoder_2.kind else [])
    encoders = [clip.create_text_encoder(te, dtype=unet.dtype, param_dtype=unet.param_dtype) for te in sections]
    embedder, frozen, output = encoders[0], not sections[0].trainable, sections[0].output
    if len(encoders) == 2:
      text.update(embedder_2=encoders[1], text_output_2=sections[1].output)
    if m.adm_in_channels:  # SDXL: the last encoder's pooled output leads the vector condition
      text["pooled_output"] = "projected" if sections[-1].projection_dim else "pooled"
  elif lat.condition == "class":
    embedder = conditioning.ClassEmbedder(num_classes=num_classes + int(null_class), features=m.context_dim,
                                          param_dtype=unet.param_dtype)
  model = unet
  if embedder is not None or lat.micro_conditioning:
    model = conditioning.ConditionedUNet(unet=unet, embedder=embedder, text_output=output, frozen=frozen,
                                         micro_conditioning=tuple(lat.micro_conditioning),
                                         micro_embed_dim=lat.micro_embed_dim, **text)
  tx = optimizer(config, config.train.learning_rate)
  exp = Experiment(config=config, model=model, diffusion=diffusion, tx=tx, num_classes=num_classes,
                   mesh=mesh_lib.make_mesh(config.mesh), network="latent_diffusion", null_class=null_class,
                   condition=latent_lib.conditioner_for(config, tokenizer, num_classes), first_stage=stage,
                   tokenizer=tokenizer)
  exp.make_state = functools.partial(_latent_state, exp=exp, frozen=frozen)
  exp.frozen_loader = functools.partial(_frozen_weights, exp=exp, frozen=frozen)
  if m.init_from:
    exp.initial_params = functools.partial(_imported_unet, exp=exp)
  exp.state_sharding = mesh_lib.state_sharding(exp.abstract_state(), exp.mesh)
  return exp


def latent_dummy_inputs(exp: Experiment) -> tuple:
  """(x, t, raw condition) of a batch of one for a latent job's network."""
  x = jnp.zeros((1, *exp.diffusion_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  cond = None
  if exp.condition is not None:
    cond = jax.tree.map(lambda v: v[:1], exp.condition.null(1))
  return x, t, cond


def _latent_state(key, *, exp: Experiment, frozen: bool) -> TrainState:
  params = dict(exp.model.init(key, *latent_dummy_inputs(exp), train=False)["params"])
  if frozen:  # frozen text encoders are read from their weights, never trained or checkpointed
    params.pop("embedder")
    params.pop("embedder_2", None)
  return create_state(params, exp.tx, num_timesteps=exp.diffusion.num_timesteps)


def frozen_embedders(frozen: dict) -> dict:
  """The frozen text encoders' params among the frozen weights, as ConditionedUNet params entries."""
  return {k: v for k, v in frozen.items() if k in ("embedder", "embedder_2")}


def _frozen_weights(*, exp: Experiment, frozen: bool) -> dict:
  weights = {"autoencoder": _first_stage_params(exp.config, exp.first_stage)}
  if frozen:
    from jaxdiff.convert import clip as convert_clip
    te = exp.config.text_encoder
    if not te.init_from:
      raise ConfigError("A frozen text encoder (text_encoder.trainable=False) needs weights: set "
                        "--config.text_encoder.init_from to a transformers CLIPTextModel folder, or train it with "
                        "text_encoder.trainable=True.")
    weights["embedder"] = convert_clip.load_text_encoder(te.init_from, te)[1]
    te2 = exp.config.text_encoder_2
    if te2.kind:  # a single SDXL file holds both encoders: the second is its second
      index = 1 if te2.init_from == te.init_from and os.path.isfile(te2.init_from) else 0
      weights["embedder_2"] = convert_clip.load_text_encoder(te2.init_from, te2, index=index)[1]
  return weights


def _first_stage_params(config, stage):
  """The first stage's weights on the host (a workdir's EMA weights when `latent.autoencoder_use_ema`)."""
  if stage.workdir:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.job = "autoencoder"
    cfg.autoencoder.update(stage.section.to_dict())
    cfg.autoencoder.init_from = None
    cfg.autoencoder_loss.update(stage.loss_keys)  # the discriminator's layout, part of that run's signature
    cfg.train.grad_accum_steps = 1
    exp = build(cfg, network="autoencoder")  # restored like any autoencoder run
    params, _ = exp.restore_params(stage.workdir, use_ema=config.latent.autoencoder_use_ema, weights_only=True)
    return params
  from jaxdiff.convert import autoencoder as convert_autoencoder
  return convert_autoencoder.load_autoencoder(stage.init_from, stage.section)[1]


def _imported_unet(abstract_params, *, exp: Experiment):
  """model.init_from: a diffusers UNet2DConditionModel folder or a single-file LDM/SD checkpoint's UNet."""
  from jaxdiff.convert import sd_unet
  size = exp.config.data.image_size // exp.first_stage.factor
  unet = sd_unet.load_unet(exp.config.model.init_from, exp.config.model, image_size=size)
  return {"unet": unet} if "unet" in abstract_params else unet
