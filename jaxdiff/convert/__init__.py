"""PyTorch -> jaxdiff weight conversion: diffusers UNet2DModel folders and guided-/improved-diffusion state dicts.

  python -m jaxdiff.convert --from=64x64_diffusion.pt --config=configs/adm_imagenet64.py --workdir=runs/adm64
  python sample.py --config=configs/adm_imagenet64.py --config.model.init_from=64x64_diffusion.pt --workdir=out

A path that is a folder is read as a diffusers model (config.json + diffusion_pytorch_model.safetensors); a file
(.pt/.pth/.bin via torch.load(weights_only=True), or .safetensors) as a guided-/improved-diffusion state dict.
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections

from jaxdiff import models
from jaxdiff.convert import common, diffusers, guided_diffusion
from jaxdiff.errors import CheckpointError
from jaxdiff.train import experiment as experiment_lib
from jaxdiff.train import mesh as mesh_lib
from jaxdiff.train.state import create_state

__all__ = ['Converted', 'load_classifier', 'load_diffusers', 'load_guided_diffusion', 'load_for_model',
           'read_state_dict', 'write_checkpoint']

read_state_dict = common.read_state_dict
# UNet fields that change what the network computes without changing any parameter shape.
_FREE_FIELDS = ('parent', 'name', 'dtype', 'param_dtype', 'remat', 'dropout')


@dataclasses.dataclass
class Converted:
  params: Any
  model_config: ml_collections.ConfigDict  # a `config.model` section describing the converted network
  image_size: int
  in_channels: int
  out_channels: int


def load_diffusers(folder: str) -> Converted:
  """A diffusers UNet2DModel folder: the network comes from its config.json."""
  cfg, shape = diffusers.model_config(diffusers.read_config(folder))
  model = models.create_model(cfg, num_classes=cfg.num_classes or None, **shape)
  state = common.read_state_dict(diffusers.weights_path(folder))
  params = diffusers.convert(state, model, image_size=shape['image_size'], in_channels=shape['in_channels'],
                             what=folder)
  return Converted(params, cfg, **shape)


def load_guided_diffusion(path: str, model_config: ml_collections.ConfigDict, *, image_size: int) -> Converted:
  """A guided-/improved-diffusion state dict; `model_config` gives the flags a state dict cannot tell (heads,
  attention order, dropout); classes, input and output channels are read from the weights."""
  state = common.read_state_dict(path)
  if 'input_blocks.0.0.weight' not in state or 'out.2.weight' not in state:
    raise CheckpointError(f'{path} is not a guided-diffusion UNetModel state dict: it has no input_blocks.0.0.weight '
                          'or out.2.weight.')
  cfg = ml_collections.ConfigDict(model_config.to_dict())
  labels = state.get('label_emb.weight')
  cfg.class_conditional = labels is not None
  cfg.num_classes = 0 if labels is None else int(labels.shape[0])
  in_channels, out_channels = int(state['input_blocks.0.0.weight'].shape[1]), int(state['out.2.weight'].shape[0])
  model = models.create_model(cfg, image_size=image_size, in_channels=in_channels, out_channels=out_channels,
                              num_classes=cfg.num_classes or None)
  params = guided_diffusion.convert(state, model, image_size=image_size, in_channels=in_channels, what=path)
  return Converted(params, cfg, image_size, in_channels, out_channels)


def load_for_model(path: str, model: models.UNet, *, image_size: int, in_channels: int):
  """Params for a model already built from a config (sampling and the CLI): every key and shape is checked, and a
  diffusers folder's layout options (embedding order, norm eps, padding, ...) must agree with the config too."""
  if not os.path.isdir(path):
    return guided_diffusion.convert(read_state_dict(path), model, image_size=image_size, in_channels=in_channels,
                                    what=path)
  cfg, shape = diffusers.model_config(diffusers.read_config(path))
  expected = models.create_model(cfg, num_classes=cfg.num_classes or None, **shape)
  diffs = [f'model.{f.name}: {getattr(expected, f.name)!r} in {path}, {getattr(model, f.name)!r} in the config'
           for f in dataclasses.fields(models.UNet)
           if f.name not in _FREE_FIELDS and getattr(expected, f.name) != getattr(model, f.name)]
  if shape['image_size'] != image_size:
    diffs.insert(0, f'data.image_size: {shape["image_size"]} in {path}, {image_size} in the config')
  if diffs:
    raise CheckpointError(f'The config does not describe the diffusers model ({"; ".join(diffs[:3])}'
                          f'{"; ..." if len(diffs) > 3 else ""}): fix those config keys.')
  return diffusers.convert(read_state_dict(diffusers.weights_path(path)), model, image_size=image_size,
                           in_channels=in_channels, what=path)


def load_classifier(path: str, model: models.EncoderUNet, *, image_size: int, in_channels: int):
  """Params of a noisy classifier built from `config.classifier` out of a guided-diffusion EncoderUNetModel file
  (64x64_classifier.pt, ...): every key and shape checked; the class count and image size named when they differ."""
  state = read_state_dict(path)
  heads = guided_diffusion.CLASSIFIER_HEADS[model.pool]
  head = f'{heads[guided_diffusion.CLASSIFIER_LOGITS[model.pool]]}.bias'
  if head in state and state[head].shape[0] != model.out_channels:
    raise CheckpointError(f'{path} classifies into {state[head].shape[0]} classes and the diffusion model has '
                          f'{model.out_channels} (model.num_classes or the dataset\'s): guide with a classifier of the '
                          'same classes.')
  position = state.get(f"{heads['pool']}.positional_embedding") if model.pool == 'attention' else None
  if position is not None:
    downsampled = image_size // 2 ** (len(model.channel_mult) - 1)
    if position.shape[-1] != downsampled ** 2 + 1:
      raise CheckpointError(f'{path} was trained on other images than data.image_size={image_size} (its attention '
                            f'pool has {position.shape[-1] - 1} positions, this size gives {downsampled ** 2}): '
                            'use a classifier of the diffusion model\'s image size.')
  return guided_diffusion.convert_classifier(state, model, image_size=image_size, in_channels=in_channels, what=path)


def write_checkpoint(path: str, config, workdir: str) -> str:
  """Converts `path` for the model `config` describes and saves it as step 0 of `workdir`'s orbax checkpoints
  (params and EMA params both the converted weights), which sample.py and train.py then restore.

  Refuses a workdir that already holds checkpoints: sampling restores the newest step, so converted weights beside
  later steps would be silently ignored. Every process reads the file and keeps its share of the state.
  """
  exp = experiment_lib.build(config, job="convert")
  checkpointer = exp.checkpointer(workdir)
  try:
    if checkpointer.all_steps() or os.path.isdir(checkpointer.aside_directory):
      raise CheckpointError(
          f'{checkpointer.directory} already holds checkpoints (steps {checkpointer.all_steps() or "set aside"}): '
          'convert into a new --workdir.')
    params = load_for_model(path, exp.model, image_size=config.data.image_size, in_channels=config.data.channels)
    params = mesh_lib.host_to_mesh(params, exp.state_sharding.params, process_local=False)
    state = jax.jit(functools.partial(create_state, tx=exp.tx, num_timesteps=exp.diffusion.num_timesteps),
                    out_shardings=exp.state_sharding)(params)
    checkpointer.save(0, state, force=True)
  finally:
    checkpointer.close()
  return checkpointer.directory
