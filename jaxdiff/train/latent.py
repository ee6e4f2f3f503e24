"""The pieces latent diffusion adds to a diffusion experiment (config.job="latent_diffusion"): the frozen first stage
and its scale factor, the conditioner (LDM's class embedder or a text encoder with its tokenizer), and the frozen
weights both read.

The diffused data is `scale_factor * latents(images)`, drawn inside the jitted train step from the frozen
autoencoder (encoding in the step costs one encoder pass per example and step; caching latents would fix the KL
posterior's sample and the random flips, which LDM also draws afresh). Samples are decoded from `latents /
scale_factor` inside the jitted sampling program.
"""

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np

from jaxdiff.errors import CheckpointError, ConfigError
from jaxdiff.models import autoencoder as autoencoder_lib
from jaxdiff.models import conditioning

LATENT_SCALE_FILE = "latent_scale.json"  # written by the autoencoder job beside its checkpoints


@dataclasses.dataclass
class FirstStage:
  """The frozen autoencoder of a latent job: its network, where its weights are, and the latent scale factor."""
  model: Any
  section: ml_collections.ConfigDict  # the autoencoder section the weights fit
  scale_factor: float
  workdir: str | None  # a jaxdiff autoencoder run, or None for autoencoder.init_from
  init_from: str | None
  loss_keys: dict = dataclasses.field(default_factory=dict)  # the run's autoencoder_loss entries its state has

  @property
  def factor(self) -> int:
    return 2 ** (len(self.section.channel_mult) - 1)

  @property
  def latent_channels(self) -> int:
    return self.section.latent_channels

  def signature(self) -> dict:
    """What a latent model's checkpoint must agree with: the latents' layout and scale (not where the weights
    are: a moved autoencoder run is the same autoencoder)."""
    section = {k: list(v) if isinstance(v, tuple) else v for k, v in self.section.to_dict().items()
               if k not in ("init_from", "eval_split", "eval_batches", "scale_batches", "scale_factor")}
    return {"autoencoder": section, "scale_factor": self.scale_factor}


def first_stage(config) -> FirstStage:
  """The first stage of `config`: a jaxdiff autoencoder workdir (`latent.autoencoder_workdir`; its network and
  measured scale factor come from the run) or imported weights (`autoencoder.init_from` with the config's
  autoencoder section). `autoencoder.scale_factor` > 0 overrides the measured factor."""
  lat, a = config.latent, config.autoencoder
  section = ml_collections.ConfigDict(a.to_dict())
  scale = float(a.scale_factor)
  loss_keys = {}
  if lat.autoencoder_workdir:
    from jaxdiff.train import checkpoint as checkpoint_lib  # the checkpoint module imports the models
    saved = checkpoint_lib.saved_run(lat.autoencoder_workdir, job="autoencoder", key="latent.autoencoder_workdir")
    loss_keys = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith("autoencoder_loss.")}
    section.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved["autoencoder"].items()})
    if saved["data.channels"] != config.data.channels:
      raise CheckpointError(f"The autoencoder in {lat.autoencoder_workdir} encodes {saved['data.channels']}-channel "
                            f"images and data.channels={config.data.channels}: use an autoencoder of this data.")
    if not scale:
      path = os.path.join(lat.autoencoder_workdir, LATENT_SCALE_FILE)
      if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the autoencoder job writes it when it shows its results (rerun "
                              "it to its end), or set --config.autoencoder.scale_factor.")
      with open(path) as f:
        scale = float(json.load(f)["scale_factor"])
  elif not scale:
    raise ConfigError("autoencoder.scale_factor=0 asks for the factor an autoencoder run measured, but imported "
                      "weights (autoencoder.init_from) bring none: set it (Stable Diffusion 1.x/2.x: 0.18215, "
                      "SDXL: 0.13025).")
  model = autoencoder_lib.create_autoencoder(section, channels=config.data.channels)
  return FirstStage(model=model, section=section, scale_factor=scale, workdir=lat.autoencoder_workdir or None,
                    init_from=None if lat.autoencoder_workdir else a.init_from, loss_keys=loss_keys)


def load_tokenizer(config, section: str = "text_encoder"):
  """The tokenizer of a text encoder section, checked against the encoder's vocabulary."""
  from jaxdiff.models import tokenizer as tokenizer_lib
  te = config[section]
  if not te.tokenizer:
    raise ConfigError(f"latent.condition='text' needs a tokenizer: set --config.{section}.tokenizer to a folder "
                      "with vocab.json + merges.txt (or tokenizer.json).")
  tokenizer = tokenizer_lib.load_tokenizer(te.tokenizer, max_length=te.max_length, pad_token=te.pad_token)
  if tokenizer.vocab_size > te.vocab_size:
    raise ConfigError(f"The tokenizer in {te.tokenizer} has {tokenizer.vocab_size} tokens and {section}.vocab_size="
                      f"{te.vocab_size}: set the vocabulary size to at least the tokenizer's.")
  return tokenizer


@dataclasses.dataclass(frozen=True)
class TokenizerPair:
  """Two text encoders' tokenizers as one: texts -> int32 [N, L1 + L2], each tokenizer's ids side by side, so the
  data pipeline carries them as one `tokens` array (TextConditioner splits them)."""
  first: Any
  second: Any

  def __call__(self, texts) -> np.ndarray:
    return np.concatenate([np.asarray(self.first(texts)), np.asarray(self.second(texts))], axis=1)


def load_tokenizers(config):
  """The text encoder's tokenizer, or with text_encoder_2 the pair of both."""
  first = load_tokenizer(config)
  return TokenizerPair(first, load_tokenizer(config, "text_encoder_2")) if config.text_encoder_2.kind else first


def conditioner_for(config, tokenizer, num_classes: int):
  lat = config.latent
  base = None
  if lat.condition == "text":
    pair = isinstance(tokenizer, TokenizerPair)
    first = tokenizer.first if pair else tokenizer
    base = conditioning.TextConditioner(np.asarray(first([""])[0], np.int32),
                                        np.asarray(tokenizer.second([""])[0], np.int32) if pair else None,
                                        zero_null=lat.text_null == "zeros")
  elif lat.condition == "class" or config.model.class_conditional:
    base = conditioning.ClassConditioner(num_classes)
  if lat.micro_conditioning:
    return conditioning.MicroConditioner(base, tuple(lat.micro_conditioning), tuple(lat.micro_drop_probs))
  return base
