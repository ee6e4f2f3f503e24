"""Every config key's rule (type, range, allowed values) and the constraints between keys, checked in one place.

`validate(config)` runs before a job does anything (the CLIs call it before jax.distributed starts, and
experiment.build calls it and then `validate_for_devices(config, job=...)`): a bad value stops with one ConfigError
naming the key and the fix. `SCHEMA` must list exactly the keys of jaxdiff/defaults.py; a key
that a later feature adds gets its rule here (tests/test_config_schema.py fails until it does), and each rule knows a
bad value, so the test can show that every key is checked.
"""

import dataclasses
import os
import re
from typing import Any, Callable

from jaxdiff.errors import ConfigError

JOBS = ("train", "sample", "likelihood", "convert", "evaluate")
# What `config.job` trains (train.py); the other CLI jobs run diffusion models only.
NETWORK_JOBS = ("diffusion", "classifier", "autoencoder", "latent_diffusion")
LATENT_CONDITIONS = ("none", "class", "text")
AUTOENCODER_KINDS = ("kl", "vq")
TEXT_ENCODER_KINDS = ("", "clip")
RECONSTRUCTION_LOSSES = ("l1", "l2")
DISC_LOSSES = ("hinge", "vanilla")
LABEL_MODES = ("cycle", "fixed", "random")
CROPS = ("center", "random")
TEXT_NULLS = ("empty_prompt", "zeros")


@dataclasses.dataclass(frozen=True)
class Rule:
  """A predicate on one value, the words that say what it accepts, and a value it refuses (for the tests)."""
  accepts: Callable[[Any], bool]
  expected: str
  bad: str  # as written on the command line: --config.<key>=<bad>
  optional: bool = False  # None (an unset placeholder) is accepted

  def check(self, key: str, value):
    if value is None and self.optional:
      return
    try:
      ok = value is not None and self.accepts(value)
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise ConfigError(f"{key}={value!r} is not valid: use {self.expected} (--config.{key}=...).")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def integer(low: int, high: int | None = None, *, optional: bool = False) -> Rule:
  words = (f"an integer >= {low}" if high is None else str(low) if low == high else
           f"an integer in [{low}, {high}]")
  return Rule(lambda v: _is_int(v) and v >= low and (high is None or v <= high), words, str(low - 1), optional)


def number(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> Rule:
  def accepts(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and (v > low if low_open else v >= low)
            and (high is None or (v < high if high_open else v <= high)))
  words = f"a number {'>' if low_open else '>='} {low}" + (
      "" if high is None else f" and {'<' if high_open else '<='} {high}")
  return Rule(accepts, words, str(low - 1))


def boolean() -> Rule:
  return Rule(lambda v: isinstance(v, bool), "True or False", "maybe")


def choice(values) -> Rule:
  values = tuple(values)
  bad = str(max(values) + 1) if all(_is_int(v) for v in values) else "nope"  # refused, yet of the key's type
  return Rule(lambda v: v in values and type(v) is type(values[0]), f"one of {', '.join(map(repr, values))}", bad)


def text(*, optional: bool = False, pattern: str = r".+", words: str = "a non-empty string", bad: str = "") -> Rule:
  return Rule(lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None, words, bad, optional)


def path(*, exists: bool, optional: bool = True) -> Rule:
  """A file or folder path; with exists, it must be there when the job starts."""
  if exists:
    return Rule(lambda v: isinstance(v, str) and os.path.exists(v), "a path that exists", "/nonexistent/jaxdiff",
                optional)
  return Rule(lambda v: isinstance(v, str) and v != "" and not os.path.isfile(v), "a folder path (not a file)",
              os.path.abspath(__file__), optional)


def integers(low: int, *, allow_empty: bool = False) -> Rule:
  def accepts(v):
    return isinstance(v, (tuple, list)) and (allow_empty or len(v) > 0) and all(_is_int(x) and x >= low for x in v)
  return Rule(accepts, f"a {'' if allow_empty else 'non-empty '}tuple of integers >= {low}", f"({low - 1},)")


def pair(*, low: int = 1, allow_empty: bool = False) -> Rule:
  """Two integers >= low, as (height, width) or (top, left); or () when allow_empty."""
  return Rule(lambda v: isinstance(v, (tuple, list)) and ((allow_empty and len(v) == 0) or (
      len(v) == 2 and all(_is_int(x) and x >= low for x in v))),
              f"two integers >= {low}" + (" or ()" if allow_empty else ""), "(1,)")


def either(*rules: Rule) -> Rule:
  return Rule(lambda v: any(r.accepts(v) for r in rules), " or ".join(r.expected for r in rules), rules[0].bad)


def network_rules(section: str) -> dict[str, Rule]:
  """The keys the UNet (`model`) and the noisy classifier (`classifier`) share: their common trunk."""
  channel_mult = Rule(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(
      isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v),
                      "a non-empty tuple of positive numbers", "()")
  rules = {
      "base_channels": integer(1),
      "channel_mult": channel_mult,
      "num_res_blocks": either(integer(1), integers(1)),
      "attention_resolutions": integers(1, allow_empty=True),
      "num_heads": either(integer(1), integers(1)),
      "num_head_channels": either(integer(-1, -1), integer(1)),
      "legacy_qkv_order": boolean(),
      "use_scale_shift_norm": boolean(),
      "resblock_updown": boolean(),
      "dropout": number(0, 1, high_open=True),
      "norm_groups": integer(1),
  }
  return {f"{section}.{key}": rule for key, rule in rules.items()}


def _schema() -> dict[str, Rule]:
  # Imported here so importing this module stays light; the choices live beside the code that uses them.
  from jaxdiff.data.pipeline import CAPTION_SOURCES, is_caption_template
  from jaxdiff.diffusion import gaussian, samplers, schedules, timesteps
  from jaxdiff.models import DTYPES, POOLS
  from jaxdiff.models.layers import DOWNSAMPLE_PADDINGS
  from jaxdiff.models import clip
  from jaxdiff.models.conditioning import MICRO_SCALARS
  from jaxdiff.train.state import LR_SCHEDULES
  micro_keys = tuple(MICRO_SCALARS)
  seed = integer(0, 2 ** 32 - 1)
  text_encoder_rules = {
      "text_encoder.kind": choice(TEXT_ENCODER_KINDS),
      "text_encoder.vocab_size": integer(2),
      "text_encoder.width": integer(1),
      "text_encoder.num_layers": integer(1),
      "text_encoder.num_heads": integer(1),
      "text_encoder.max_length": integer(2),
      "text_encoder.activation": choice(clip.ACTIVATIONS),
      "text_encoder.output": choice(clip.OUTPUTS),
      "text_encoder.projection_dim": integer(0),
      "text_encoder.eos_token_id": integer(0),
      "text_encoder.pad_token": text(pattern=r"\S*", words="'' (the tokenizer folder's) or one token without spaces",
                                     bad="a b"),
      "text_encoder.tokenizer": path(exists=True),
      "text_encoder.init_from": path(exists=True),
      "text_encoder.trainable": boolean(),
  }
  return {
      "job": choice(NETWORK_JOBS),
      "seed": seed,
      "mesh.data": either(integer(-1, -1), integer(1)),
      "mesh.fsdp": integer(1),
      "distributed.coordinator_address": text(optional=True, pattern=r"[^:\s]+:\d+", words="host:port",
                                              bad="no-port"),
      "distributed.num_processes": integer(1, optional=True),
      "distributed.process_id": integer(0, optional=True),
      "distributed.auto": boolean(),
      "distributed.timeout_seconds": integer(1),
      "data.name": text(),
      "data.data_dir": path(exists=False),
      "data.image_dir": path(exists=True),
      "data.split": text(),
      "data.image_size": integer(1),
      "data.channels": choice((1, 3)),
      "data.random_flip": boolean(),
      "data.random_crop": boolean(),
      "data.captions": choice(CAPTION_SOURCES),
      "data.text_feature": text(pattern=r"|[A-Za-z_]\w*", bad="0",
                                words="a text feature / metadata.jsonl column name, or '' for the only one"),
      "data.caption_template": Rule(is_caption_template, "a string with one {} for the class name, e.g. 'a photo of "
                                    "a {}'", "no-placeholder"),
      "data.crop": choice(CROPS),
      "data.multi_aspect": boolean(),
      "data.bucket_multiple": integer(1),
      "data.class_names": Rule(lambda v: isinstance(v, (tuple, list)) and all(isinstance(n, str) and n for n in v),
                               "a tuple of non-empty class names, or () for the dataset's", "(1,)"),
      **network_rules("model"),
      "model.norm_eps": number(0, 1, low_open=True, high_open=True),
      "model.conv_resample": boolean(),
      "model.downsample_padding": choice(sorted(DOWNSAMPLE_PADDINGS)),
      "model.flip_sin_to_cos": boolean(),
      "model.freq_shift": number(0),
      "model.mid_block_scale_factor": number(0, low_open=True),
      "model.patch_size": integer(1),
      "model.transformer_depth": either(integer(0), integers(0)),
      "model.context_dim": integer(0),
      "model.use_linear_projection": boolean(),
      "model.adm_in_channels": integer(0),
      "model.class_conditional": boolean(),
      "model.num_classes": integer(0),
      "model.init_from": path(exists=True),
      "model.dtype": choice(sorted(DTYPES)),
      "model.param_dtype": choice(sorted(DTYPES)),
      "model.remat": boolean(),
      "diffusion.num_timesteps": integer(1),
      "diffusion.schedule": choice(schedules.SCHEDULES),
      "diffusion.beta_start": number(0, 1, low_open=True, high_open=True),
      "diffusion.beta_end": number(0, 1, low_open=True, high_open=True),
      "diffusion.mean_type": choice(m.value for m in gaussian.MeanType),
      "diffusion.var_type": choice(m.value for m in gaussian.VarType),
      "diffusion.loss": choice(m.value for m in gaussian.LossType),
      "diffusion.vlb_weight": number(0, low_open=True),
      "diffusion.min_snr_gamma": number(0),
      "train.batch_size": integer(1),
      "train.num_steps": integer(0),
      "train.learning_rate": number(0, low_open=True),
      "train.warmup_steps": integer(0),
      "train.lr_schedule": choice(LR_SCHEDULES),
      "train.grad_clip": number(0),
      "train.grad_accum_steps": integer(1),
      "train.skip_nonfinite_steps": boolean(),
      "train.max_consecutive_skips": integer(0),
      "train.ema_decay": number(0, 1, high_open=True),
      "train.log_every": integer(1),
      "train.checkpoint_every": integer(1),
      "train.keep_checkpoints": integer(1),
      "train.sample_every": integer(0),
      "train.num_grid_samples": integer(1),
      "train.timestep_sampler": choice(m.value for m in timesteps.TimestepSampler),
      "train.weight_decay": number(0),
      "train.cond_drop_prob": number(0, 1, high_open=True),
      "train.adam_b1": number(0, 1, high_open=True),
      "train.adam_b2": number(0, 1, high_open=True),
      "train.disc_start": integer(0),
      "train.disc_learning_rate": number(0),
      "train.compilation_cache_dir": text(pattern=r"\S*", words="a folder, '' (<workdir>/compilation_cache) or 'none'",
                                          bad="two words"),
      **network_rules("classifier"),
      "classifier.pool": choice(POOLS),
      "classifier.eval_split": text(pattern=r"|[A-Za-z][\w\[\]:%+.,\- ]*", bad="0",
                                    words="a split such as 'validation' or 'train[4500:]', or '' for none"),
      "classifier.eval_batches": integer(1),
      "autoencoder.kind": choice(AUTOENCODER_KINDS),
      "autoencoder.base_channels": integer(1),
      "autoencoder.channel_mult": integers(1),
      "autoencoder.num_res_blocks": integer(1),
      "autoencoder.latent_channels": integer(1),
      "autoencoder.mid_attention": boolean(),
      "autoencoder.attention_levels": integers(0, allow_empty=True),
      "autoencoder.norm_groups": integer(1),
      "autoencoder.num_embeddings": integer(2),
      "autoencoder.embedding_dim": integer(0),
      "autoencoder.beta": number(0),
      "autoencoder.scale_factor": number(0),
      "autoencoder.scale_batches": integer(1),
      "autoencoder.init_from": path(exists=True),
      "autoencoder.eval_split": text(pattern=r"|[A-Za-z][\w\[\]:%+.,\- ]*", bad="0",
                                     words="a split such as 'validation' or 'train[4500:]', or '' for none"),
      "autoencoder.eval_batches": integer(1),
      "autoencoder_loss.reconstruction": choice(RECONSTRUCTION_LOSSES),
      "autoencoder_loss.perceptual_weight": number(0),
      "autoencoder_loss.lpips_vgg": path(exists=True),
      "autoencoder_loss.lpips_heads": path(exists=True),
      "autoencoder_loss.kl_weight": number(0),
      "autoencoder_loss.codebook_weight": number(0),
      "autoencoder_loss.disc_weight": number(0),
      "autoencoder_loss.disc_factor": number(0),
      "autoencoder_loss.disc_loss": choice(DISC_LOSSES),
      "autoencoder_loss.disc_layers": integer(1),
      "autoencoder_loss.disc_channels": integer(1),
      "latent.autoencoder_workdir": path(exists=True),
      "latent.autoencoder_use_ema": boolean(),
      "latent.condition": choice(LATENT_CONDITIONS),
      "latent.micro_conditioning": Rule(lambda v: isinstance(v, (tuple, list)) and all(k in micro_keys for k in v)
                                        and len(set(v)) == len(v), f"a tuple of distinct names from {micro_keys}",
                                        "('size',)"),
      "latent.micro_embed_dim": Rule(lambda v: _is_int(v) and v >= 2 and v % 2 == 0, "an even integer >= 2", "3"),
      "latent.micro_drop_probs": Rule(lambda v: isinstance(v, (tuple, list)) and all(
          isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1 for p in v),
                                      "a tuple of probabilities in [0, 1), one per micro key", "(1.5,)"),
      "latent.text_null": choice(TEXT_NULLS),
      **text_encoder_rules,
      **{key.replace("text_encoder.", "text_encoder_2.", 1): rule for key, rule in text_encoder_rules.items()},
      "sample.num_samples": integer(1),
      "sample.per_device_batch_size": integer(1),
      "sample.clip_denoised": boolean(),
      "sample.use_ema": boolean(),
      "sample.seed": seed,
      "sample.sampler": choice(samplers.SAMPLERS),
      "sample.timestep_respacing": Rule(lambda v: isinstance(v, str), "'', 'N', 'N1,N2,...', 'ddimN', 'leadingN', "
                                        "'trailingN' or 'linspaceN'", "abc"),
      "sample.steps_offset": integer(0),
      "sample.set_alpha_to_one": boolean(),
      "sample.eta": number(0),
      "sample.height": integer(0),
      "sample.width": integer(0),
      "sample.original_size": pair(allow_empty=True),
      "sample.crops_coords_top_left": pair(low=0),
      "sample.target_size": pair(allow_empty=True),
      "sample.aesthetic_score": number(0),
      "sample.negative_aesthetic_score": number(0),
      "sample.init_images": path(exists=True),
      "sample.strength": number(0, 1, low_open=True),
      "sample.denoising_start": number(0, 1, high_open=True),
      "sample.denoising_end": number(0, 1, low_open=True),
      "sample.prompt": text(pattern=r"[^\n\r]*", words="one line of text (several prompts: sample.prompt_file)",
                            bad="two\nlines"),
      "sample.prompt_file": path(exists=True),
      "sample.negative_prompt": text(pattern=r"[^\n\r]*", words="one line of text", bad="two\nlines"),
      "sample.labels": choice(LABEL_MODES),
      "sample.class_label": integer(0),
      "sample.guidance_scale": number(0),
      "sample.classifier_scale": number(0),
      "sample.classifier_workdir": path(exists=True),
      "sample.classifier_from": path(exists=True),
      "likelihood.num_batches": integer(1),
      "likelihood.batch_size": integer(1),
      "likelihood.split": text(),
      "likelihood.seed": seed,
      "likelihood.use_ema": boolean(),
      "likelihood.clip_denoised": boolean(),
  }


SCHEMA = None


def schema() -> dict[str, Rule]:
  global SCHEMA
  if SCHEMA is None:
    SCHEMA = _schema()
  return SCHEMA


def flatten(config) -> dict[str, Any]:
  """{dotted key: value} of every leaf of a ConfigDict (or dict)."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
    else:
      out[key] = value
  return out


def _cross_checks(config, job: str | None = None):
  """Constraints between keys. Pure Python and NumPy: no JAX backend starts, so it runs before jax.distributed."""
  d, m, dist = config.data, config.model, config.distributed
  if dist.coordinator_address and (dist.num_processes is None or dist.process_id is None):
    raise ConfigError("distributed.coordinator_address needs distributed.num_processes and distributed.process_id "
                      "(or set distributed.auto=True on a TPU pod or SLURM job).")
  if dist.num_processes is not None and dist.process_id is not None and dist.process_id >= dist.num_processes:
    raise ConfigError(f"distributed.process_id={dist.process_id} must be below distributed.num_processes="
                      f"{dist.num_processes}.")
  from jaxdiff.data.pipeline import IMAGE_FOLDER
  if d.name == IMAGE_FOLDER and not d.image_dir:
    raise ConfigError(f"data.name={IMAGE_FOLDER!r} needs a folder of images: set --config.data.image_dir.")
  if d.image_dir and d.name != IMAGE_FOLDER:
    raise ConfigError(f"data.image_dir is only read with data.name={IMAGE_FOLDER!r}: set that, or unset image_dir.")
  if d.multi_aspect and d.image_size % d.bucket_multiple:
    raise ConfigError(f"data.multi_aspect: data.image_size={d.image_size} (the pixel budget's side) must be a multiple "
                      f"of data.bucket_multiple={d.bucket_multiple}.")
  if d.text_feature and d.captions != "text":
    raise ConfigError(f"data.text_feature={d.text_feature!r} is only read with data.captions='text': set that, or "
                      "unset text_feature.")
  if config.job == "autoencoder":  # it reads no diffusion, UNet or sampling section
    _autoencoder_checks(config, job)
    return
  # The schedule, sampler and network check the rest of their sections as they are built.
  latent = config.job == "latent_diffusion"
  if latent:
    _latent_checks(config, job)
  elif m.context_dim or config.latent.condition != "none" or m.adm_in_channels or config.latent.micro_conditioning:
    raise ConfigError(f"model.context_dim={m.context_dim} / latent.condition={config.latent.condition!r} / "
                      f"model.adm_in_channels={m.adm_in_channels} / latent.micro_conditioning condition a latent "
                      "diffusion model: set --config.job=latent_diffusion, or 0 / 'none' / ().")
  from jaxdiff.diffusion import gaussian, get_sampler, schedules
  betas = schedules.get_betas(config.diffusion.schedule, config.diffusion.num_timesteps,
                              beta_start=config.diffusion.beta_start, beta_end=config.diffusion.beta_end)
  schedules.space_timesteps(len(betas), config.sample.timestep_respacing, sampler=config.sample.sampler,
                            steps_offset=config.sample.steps_offset)
  var_type = gaussian.VarType(config.diffusion.var_type)
  gaussian.parse_loss(config.diffusion.loss, var_type)
  get_sampler(config.sample.sampler, eta=config.sample.eta)
  from jaxdiff import models
  factor = 2 if var_type == gaussian.VarType.LEARNED_RANGE else 1
  if not latent:  # a latent UNet is built at the first stage's latent size (_latent_checks)
    models.create_model(m, image_size=d.image_size, in_channels=d.channels, out_channels=d.channels * factor,
                        num_classes=(m.num_classes or 2) if m.class_conditional else None)
  _guidance_checks(config)


def _latent_checks(config, job: str | None):
  """A latent job's first stage, conditioning and text encoder (the UNet is checked at the latent size when the
  autoencoder's layout is in the config; an autoencoder run's layout is read from its checkpoint when built)."""
  lat, a, m, te, s = config.latent, config.autoencoder, config.model, config.text_encoder, config.sample
  if bool(lat.autoencoder_workdir) == bool(a.init_from):
    raise ConfigError("A latent diffusion model needs one frozen autoencoder: set --config.latent.autoencoder_workdir "
                      "(a config.job=autoencoder run) or --config.autoencoder.init_from (PyTorch weights), not "
                      f"{'both' if a.init_from else 'neither'}.")
  if s.clip_denoised:
    raise ConfigError("sample.clip_denoised=True clips to [-1, 1], and latents are not bounded: set "
                      "--config.sample.clip_denoised=False for latent diffusion.")
  if s.classifier_scale > 0:
    raise ConfigError("sample.classifier_scale > 0: classifier guidance runs on pixels; guide a latent model with "
                      "sample.guidance_scale (classifier-free).")
  if lat.condition in ("class", "text") and not m.context_dim:
    raise ConfigError(f"latent.condition={lat.condition!r} cross-attends to a context: set model.context_dim (and "
                      "model.transformer_depth >= 1).")
  if lat.condition == "none" and m.context_dim:
    raise ConfigError(f"model.context_dim={m.context_dim} needs a context: set latent.condition to 'class' or 'text', "
                      "or context_dim=0.")
  if lat.condition == "text":
    if te.kind != "clip":
      raise ConfigError("latent.condition='text' needs a text encoder: set --config.text_encoder.kind=clip.")
    if te.width != m.context_dim and not config.text_encoder_2.kind:
      raise ConfigError(f"text_encoder.width={te.width} differs from model.context_dim={m.context_dim}: the UNet "
                        "cross-attends to the text encoder's hidden states, so set both to the same width.")
    if not te.tokenizer:
      raise ConfigError("latent.condition='text' needs a tokenizer: set --config.text_encoder.tokenizer to a folder "
                        "with vocab.json + merges.txt (or tokenizer.json).")
    if not te.trainable and not te.init_from:
      raise ConfigError("A frozen text encoder (text_encoder.trainable=False) needs weights: set "
                        "--config.text_encoder.init_from, or train it with text_encoder.trainable=True.")
    if job == "sample" and not (s.prompt or s.prompt_file):
      raise ConfigError("A text-conditioned model samples from prompts: set --config.sample.prompt or "
                        "--config.sample.prompt_file (one prompt a line).")
    if job == "train" and config.data.captions == "":
      raise ConfigError("latent.condition='text' trains on captions: set --config.data.captions to 'text' (the "
                        "data's) or 'label' (made from the class names).")
  elif te.kind:
    raise ConfigError(f"text_encoder.kind={te.kind!r} is read only with latent.condition='text': set that, or ''.")
  _sdxl_checks(config, job)
  if a.init_from:
    from jaxdiff import models
    from jaxdiff.models import autoencoder
    autoencoder.create_autoencoder(a, channels=config.data.channels)
    f = 2 ** (len(a.channel_mult) - 1)
    if config.data.image_size % f:
      raise ConfigError(f"data.image_size={config.data.image_size} must be a multiple of {f}, the downsampling "
                        f"factor of autoencoder.channel_mult={tuple(a.channel_mult)}.")
    models.create_model(m, image_size=config.data.image_size // f, in_channels=a.latent_channels,
                        out_channels=a.latent_channels, num_classes=(m.num_classes or 2) if m.class_conditional
                        else None)


def expected_adm_in_channels(config) -> int:
  """The width of cond['vector'] the conditioning gives: the last text encoder's pooled output (projected when it
  has a projection) and micro_embed_dim per micro-conditioning scalar (two per size or crop, one per score)."""
  lat, te, te2 = config.latent, config.text_encoder, config.text_encoder_2
  last = te2 if te2.kind else te
  pooled = (last.projection_dim or last.width) if lat.condition == "text" else 0
  from jaxdiff.models.conditioning import MICRO_SCALARS
  scalars = sum(MICRO_SCALARS[key] for key in lat.micro_conditioning)
  return pooled + scalars * lat.micro_embed_dim


def _sdxl_checks(config, job: str | None):
  """A second text encoder, the vector condition and the micro-conditioning fit one another."""
  lat, m, te, te2, s = config.latent, config.model, config.text_encoder, config.text_encoder_2, config.sample
  if te2.kind:
    if lat.condition != "text" or te.kind != "clip":
      raise ConfigError("text_encoder_2 is a second text encoder: set latent.condition='text' and text_encoder.kind "
                        "too, or text_encoder_2.kind=''.")
    if te.width + te2.width != m.context_dim:
      raise ConfigError(f"model.context_dim={m.context_dim} must be text_encoder.width + text_encoder_2.width = "
                        f"{te.width + te2.width}: the UNet attends to both encoders' outputs side by side.")
    if not te2.tokenizer:
      raise ConfigError("text_encoder_2 needs its own tokenizer: set --config.text_encoder_2.tokenizer.")
    if te2.trainable != te.trainable:
      raise ConfigError("text_encoder.trainable and text_encoder_2.trainable differ: train both or freeze both.")
    if not te2.trainable and not te2.init_from:
      raise ConfigError("A frozen text_encoder_2 needs weights: set --config.text_encoder_2.init_from, or train it "
                        "with text_encoder_2.trainable=True.")
  if lat.text_null == "zeros" and lat.condition != "text":
    raise ConfigError("latent.text_null='zeros' is the null of a text condition: set latent.condition='text', or "
                      "text_null='empty_prompt'.")
  if lat.micro_drop_probs and len(lat.micro_drop_probs) != len(lat.micro_conditioning):
    raise ConfigError(f"latent.micro_drop_probs has {len(lat.micro_drop_probs)} entries for "
                      f"{len(lat.micro_conditioning)} latent.micro_conditioning keys: give one per key, or ().")
  if m.adm_in_channels or lat.micro_conditioning:
    expected = expected_adm_in_channels(config)
    if m.adm_in_channels != expected:
      raise ConfigError(f"model.adm_in_channels={m.adm_in_channels}, but the conditioning gives a vector of {expected} "
                        "(the last text encoder's pooled width + latent.micro_embed_dim per micro-conditioning "
                        f"scalar): set --config.model.adm_in_channels={expected}.")
  if s.denoising_start and s.denoising_end < 1 and s.denoising_start >= s.denoising_end:
    raise ConfigError(f"sample.denoising_start={s.denoising_start} must be below sample.denoising_end="
                      f"{s.denoising_end}.")
  if (s.strength < 1 or s.denoising_start) and not s.init_images and job == "sample":
    raise ConfigError("sample.strength < 1 and sample.denoising_start > 0 continue from given images or latents: set "
                      "--config.sample.init_images to an .npz (arr_0 uint8 images, or `latents`).")


def _autoencoder_checks(config, job: str | None):
  """The first stage's network, its loss's weight files (for training) and what its step does not support."""
  a, al, d = config.autoencoder, config.autoencoder_loss, config.data
  if job == "train" and al.perceptual_weight > 0 and not (al.lpips_vgg and al.lpips_heads):
    raise ConfigError(f"autoencoder_loss.perceptual_weight={al.perceptual_weight} (LPIPS) needs local weights: set "
                      "--config.autoencoder_loss.lpips_vgg=<torchvision vgg16 .pth> and "
                      "--config.autoencoder_loss.lpips_heads=<lpips weights/v0.1/vgg.pth>, or perceptual_weight=0.")
  if config.train.grad_accum_steps != 1:
    raise ConfigError(f"train.grad_accum_steps={config.train.grad_accum_steps}: the autoencoder step weighs its GAN "
                      "loss by gradient norms of the whole batch; set 1 (and lower train.batch_size for memory).")
  factor = 2 ** (len(a.channel_mult) - 1)
  if d.image_size % factor:
    raise ConfigError(f"data.image_size={d.image_size} must be a multiple of {factor}, the downsampling factor of "
                      f"autoencoder.channel_mult={tuple(a.channel_mult)}.")
  # The network checks the rest of its section as it is built.
  from jaxdiff.models import autoencoder
  autoencoder.create_autoencoder(a, channels=d.channels)


def _guidance_checks(config):
  """Classifier-free and classifier guidance, and the noisy classifier's network."""
  m, s, t = config.model, config.sample, config.train
  conditioned = m.class_conditional or (config.job == "latent_diffusion" and config.latent.condition != "none")
  if t.cond_drop_prob > 0 and not conditioned and config.job in ("diffusion", "latent_diffusion"):
    raise ConfigError(f"train.cond_drop_prob={t.cond_drop_prob} drops the class of a class-conditional model: set "
                      "--config.model.class_conditional=True, or 0.")
  if s.guidance_scale != 1 and not conditioned:
    raise ConfigError(f"sample.guidance_scale={s.guidance_scale} needs a class-conditional model: set "
                      "--config.model.class_conditional=True, or guidance_scale=1 (use sample.classifier_scale to "
                      "guide an unconditional model with a classifier).")
  if s.guidance_scale != 1 and t.cond_drop_prob == 0:
    raise ConfigError(f"sample.guidance_scale={s.guidance_scale} needs a model trained with a null class: train with "
                      "--config.train.cond_drop_prob=0.1 (and sample with the same value), or set guidance_scale=1.")
  if s.classifier_workdir and s.classifier_from:
    raise ConfigError("set one of sample.classifier_workdir and sample.classifier_from, not both.")
  if s.classifier_scale > 0 and not (s.classifier_workdir or s.classifier_from):
    raise ConfigError(f"sample.classifier_scale={s.classifier_scale} needs a classifier: set "
                      "--config.sample.classifier_workdir (a run of config.job='classifier') or "
                      "--config.sample.classifier_from (a guided-diffusion classifier file).")
  # A classifier workdir brings its own network; a classifier file is read as config.classifier describes.
  if config.job == "classifier" or (s.classifier_scale > 0 and s.classifier_from):
    from jaxdiff import models
    models.create_classifier(config.classifier, config.model, image_size=config.data.image_size,
                             num_classes=max(config.model.num_classes, 2))


def validate(config, *, job: str | None = None):
  """Raises ConfigError for the first bad key: unknown or missing keys, then each key's rule, then whether `job`
  (the CLI's) runs `config.job`, then the constraints between keys. Starts no JAX backend."""
  values = flatten(config)
  rules = schema()
  unknown = sorted(set(values) - set(rules))
  if unknown:
    raise ConfigError(f"unknown config key {unknown[0]!r}: configs start from jaxdiff/defaults.py, which lists every "
                      "key; check the spelling.")
  missing = sorted(set(rules) - set(values))
  if missing:
    raise ConfigError(f"the config lacks {missing[0]!r}: build it from jaxdiff/defaults.py's get_config().")
  for key, rule in rules.items():
    rule.check(key, values[key])
  if job in ("sample", "likelihood", "convert") and config.job not in ("diffusion", "latent_diffusion") or (
      job in ("likelihood", "convert") and config.job == "latent_diffusion"):
    if config.job == "latent_diffusion":
      raise ConfigError(f"{job} runs pixel-space diffusion models; a latent diffusion model samples with sample.py "
                        "(import Stable Diffusion weights with model.init_from / jaxdiff.load_pipeline).")
    use = ("with --config.sample.classifier_workdir=<the classifier's workdir>" if config.job == "classifier" else
           "and evaluate autoencoders with python -m jaxdiff.evaluation autoencoder")
    what = {"classifier": "a noisy classifier", "autoencoder": "an autoencoder"}[config.job]
    raise ConfigError(f"config.job={config.job!r} trains {what}, and {job} runs diffusion models: use the "
                      f"diffusion model's config, {use}.")
  _cross_checks(config, job)  # first: a bad value is named whatever the job
  if job == "evaluate" and config.job != "autoencoder":
    raise ConfigError(f"config.job={config.job!r}: python -m jaxdiff.evaluation autoencoder evaluates autoencoders "
                      "(config.job='autoencoder'); score diffusion samples with python -m jaxdiff.evaluation fid.")


def validate_for_devices(config, *, job: str | None):
  """The constraints of a job on this run's devices and processes (job None: only the mesh's)."""
  if job is not None and job not in JOBS:
    raise ValueError(f"unknown job {job!r}")

  import jax
  n, processes = jax.device_count(), jax.process_count()
  fsdp, data = config.mesh.fsdp, config.mesh.data
  if n % fsdp:
    raise ConfigError(f"mesh.fsdp={fsdp} must be a divisor of the {n} devices.")
  if data != -1 and data * fsdp != n:
    raise ConfigError(f"mesh.data={data} x mesh.fsdp={fsdp} must equal the {n} devices: set mesh.data=-1 to use all "
                      "of them.")
  if job == "train":
    t = config.train
    if t.batch_size % n or t.batch_size % processes:
      raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of the {n} devices and the {processes} "
                        "processes.")
    if t.batch_size % (t.grad_accum_steps * n):
      raise ConfigError(f"train.batch_size={t.batch_size} must split into train.grad_accum_steps="
                        f"{t.grad_accum_steps} micro-batches of a multiple of the {n} devices each.")
  if job == "likelihood":
    size = config.likelihood.batch_size
    if size % n or size % processes:
      raise ConfigError(f"likelihood.batch_size={size} must be a multiple of the {n} devices and the {processes} "
                        "processes.")
