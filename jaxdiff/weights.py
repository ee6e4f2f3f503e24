"""The weights a sampling or evaluation job runs: converted PyTorch weights (`model.init_from`) or the workdir's
newest checkpoint, and the classifier of classifier guidance. The trainer never converts: `python -m jaxdiff.convert`
writes a checkpoint it restores."""

import dataclasses
import json

import ml_collections

from jaxdiff import convert
from jaxdiff.errors import CheckpointError
from jaxdiff.train import checkpoint as checkpoint_lib
from jaxdiff.train import experiment as experiment_lib
from jaxdiff.train import mesh as mesh_lib


def load(exp: experiment_lib.Experiment, workdir: str, *, use_ema: bool):
  """(params on the mesh, step): step 0 for converted weights."""
  config = exp.config
  if config.model.init_from and exp.initial_params is not None:  # a latent UNet: its own importers
    abstract = exp.abstract_state().params
    params = exp.initial_params(abstract)
    if set(params) != set(abstract):
      raise CheckpointError(f"model.init_from={config.model.init_from} holds the UNet, and this model also trains "
                            f"its {', '.join(sorted(set(abstract) - set(params)))}: sample from the workdir of a run "
                            "that trained it, or freeze it (text_encoder.trainable=False with its weights).")
    return mesh_lib.host_to_mesh(params, exp.state_sharding.params, process_local=False), 0
  if config.model.init_from:
    params = convert.load_for_model(config.model.init_from, exp.model, image_size=config.data.image_size,
                                    in_channels=config.data.channels)
    return mesh_lib.host_to_mesh(params, exp.state_sharding.params, process_local=False), 0
  return exp.restore_params(workdir, use_ema=use_ema)


def load_classifier(exp: experiment_lib.Experiment):
  """(classifier network, params on the mesh, description) for classifier guidance: a workdir trained with
  config.job="classifier" (its network is read from its checkpoint) or a guided-diffusion classifier file (its network
  is `config.classifier`, as a state dict cannot tell it). The classifier must see the diffusion model's images and,
  for a class-conditional model, the same classes."""
  config, s = exp.config, exp.config.sample
  cfg = ml_collections.ConfigDict(config.to_dict())
  if s.classifier_workdir:
    saved = checkpoint_lib.saved_run(s.classifier_workdir, job="classifier", key="sample.classifier_workdir")
    size, channels = saved["data.image_size"], saved["data.channels"]
    if (size, channels) != (config.data.image_size, config.data.channels):
      raise CheckpointError(f"The classifier in {s.classifier_workdir} sees {size}x{size}x{channels} images and the "
                            f"diffusion model makes {config.data.image_size}x{config.data.image_size}x"
                            f"{config.data.channels}: train a classifier on the diffusion model's image size.")
    num_classes = saved["num_classes"]
    cfg.classifier.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved["classifier"].items()})
  else:
    num_classes = None
  if exp.num_classes and num_classes is not None and num_classes != exp.num_classes:
    raise CheckpointError(f"The classifier in {s.classifier_workdir} has {num_classes} classes and the diffusion "
                          f"model {exp.num_classes}: guide with a classifier of the model's classes.")
  cfg.model.num_classes = num_classes or exp.num_classes or experiment_lib.label_classes(
      config, why="sample.classifier_scale > 0")
  cexp = experiment_lib.build(cfg, job="sample", network="classifier")
  if s.classifier_workdir:
    params, step = cexp.restore_params(s.classifier_workdir, use_ema=s.use_ema, weights_only=True)
    source = {"source": "checkpoint", "step": step}
  else:
    params = convert.load_classifier(s.classifier_from, cexp.model, image_size=config.data.image_size,
                                     in_channels=config.data.channels)
    params = mesh_lib.host_to_mesh(params, cexp.state_sharding.params, process_local=False)
    source = {"source": "pytorch", "step": 0}
  network = {f.name: getattr(cexp.model, f.name) for f in dataclasses.fields(cexp.model)
             if f.name not in ("parent", "name", "dtype", "param_dtype", "remat", "dropout")}
  return cexp.model, params, dict(source, network=json.loads(json.dumps(network, default=str)))
