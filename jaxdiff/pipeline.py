"""Text-to-image pipelines for notebooks: a Stable Diffusion 1.x/2.x model from a local folder or file, sampled with
the same jitted programs as sample.py.

  import jaxdiff
  pipe = jaxdiff.load_pipeline("stable-diffusion-v1-5")            # a diffusers folder (model_index.json)
  images = pipe(["a photo of an astronaut riding a horse"], num_steps=25, guidance_scale=7.5, seed=0)  # uint8

A folder is read as diffusers saves a StableDiffusionPipeline: unet/, vae/, text_encoder/, tokenizer/ and
scheduler/scheduler_config.json (its training process becomes the diffusion config; its timestep spacing, offset and
final alpha are what DDIM and DPM-Solver++ use). A single CompVis/Stability checkpoint (.ckpt read with
weights_only=True, or .safetensors) holds the UNet, the autoencoder and the text encoder; its tokenizer is a separate
folder (`tokenizer=`) and its scheduler is Stable Diffusion's (scaled-linear betas, eps for SD 1.x, v for SD 2.x
unless `prediction_type=` says otherwise). Each (batch size, sampler, steps, guidance scale) compiles once; prompts,
the negative prompt and the seed are arguments of the compiled program.
"""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np

from jaxdiff.errors import CheckpointError, ConfigError

# Stable Diffusion's training process (diffusers' PNDM/DDIM scheduler configs of SD 1.x and 2.x).
SD_PROCESS = dict(num_timesteps=1000, schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SD_SAMPLING = dict(steps_offset=1, set_alpha_to_one=False, clip_denoised=False)
SD_SCALE_FACTOR = 0.18215
# The scheduler config of a single file: the one SD 1.x/2.x folders ship (PNDM, whose DDIM and DPM-Solver++ built
# from_config keep each class's default timestep spacing).
SD_SCHEDULER = dict(_class_name="PNDMScheduler", num_train_timesteps=1000, beta_schedule="scaled_linear",
                    beta_start=0.00085, beta_end=0.012, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
                    clip_sample=False)
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "v": "v"}


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} is missing: a Stable Diffusion folder as diffusers saves it has unet/, vae/, "
                          "text_encoder/, tokenizer/ and scheduler/scheduler_config.json.")
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise CheckpointError(f"{path} is not valid JSON ({e}).") from None


def _base_config():
  from jaxdiff import defaults
  config = defaults.get_config()
  config.job = "latent_diffusion"
  config.latent.condition = "text"
  config.text_encoder.kind = "clip"
  config.data.channels = 3
  config.sample.clip_denoised = False
  config.train.ema_decay = 0.0
  config.train.cond_drop_prob = 0.1  # SD dropped 10% of its captions: its null condition is the empty prompt
  return config


def folder_config(folder: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The config of a diffusers Stable Diffusion folder, with every part's weights as its init_from, and its
  scheduler config."""
  from jaxdiff.convert import autoencoder as convert_autoencoder
  from jaxdiff.convert import clip as convert_clip
  from jaxdiff.convert import scheduler as convert_scheduler
  from jaxdiff.convert import sd_unet
  index = _read_json(os.path.join(folder, "model_index.json"))
  part = lambda name: os.path.join(folder, name)
  for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    if name not in index or not os.path.isdir(part(name)):
      raise CheckpointError(f"{folder} has no {name}/: jaxdiff loads text-to-image folders with unet/, vae/, "
                            "text_encoder/, tokenizer/ and scheduler/ (StableDiffusionPipeline.save_pretrained).")
  config = _base_config()
  unet_section, shape = sd_unet.folder_section(part("unet"))
  config.model.update(unet_section)
  vae_cfg = _read_json(part("vae/config.json"))
  ae_section, channels = convert_autoencoder.folder_section(vae_cfg, part("vae"))
  config.autoencoder.update(ae_section)
  config.autoencoder.scale_factor = float(vae_cfg.get("scaling_factor", SD_SCALE_FACTOR))
  config.data.channels = channels
  config.data.image_size = shape["image_size"] * 2 ** (len(config.autoencoder.channel_mult) - 1)
  config.text_encoder.update(convert_clip.folder_section(_read_json(part("text_encoder/config.json")),
                                                         part("text_encoder")))
  scheduler = _read_json(part("scheduler/scheduler_config.json"))
  diffusion, sample = convert_scheduler.sampling_from_scheduler_config(scheduler)
  config.diffusion.update(diffusion)
  config.sample.update({k: v for k, v in sample.items() if k in ("steps_offset", "set_alpha_to_one")})
  config.model.init_from = part("unet")
  config.autoencoder.init_from = part("vae")
  config.text_encoder.init_from = part("text_encoder")
  config.text_encoder.tokenizer = part("tokenizer")
  _check_parts(config, shape)
  return config, scheduler


def file_config(path: str, *, tokenizer: str | None = None, prediction_type: str | None = None,
                image_size: int | None = None):
  """The config of a single-file SD 1.x/2.x checkpoint (UNet, first stage and text encoder in one state dict);
  `image_size` defaults to the model's (512, or 768 for SD 2.x 768-v)."""
  from jaxdiff.convert import autoencoder as convert_autoencoder
  from jaxdiff.convert import clip as convert_clip
  from jaxdiff.convert import sd_unet
  state = convert_autoencoder.read_weights(path)
  config = _base_config()
  _, ae_section, channels = convert_autoencoder.infer_section(convert_autoencoder.first_stage(state, path), path)
  config.autoencoder.update(ae_section)
  config.autoencoder.scale_factor = SD_SCALE_FACTOR
  config.data.channels = channels
  factor = 2 ** (len(config.autoencoder.channel_mult) - 1)
  if image_size is not None and (not isinstance(image_size, int) or image_size % factor or image_size < 1):
    raise ConfigError(f"image_size={image_size!r}: use a positive multiple of {factor}, the autoencoder's factor.")
  unet_section, shape = sd_unet.section_from_ldm_state_dict(
      state, image_size=None if image_size is None else image_size // factor, what=path)
  config.model.update(unet_section)
  config.data.image_size = shape["image_size"] * factor
  config.text_encoder.update(convert_clip.section_from_state_dict(state, what=path))
  if config.text_encoder.activation == "gelu":  # OpenCLIP (SD 2.x) pads with "!"
    config.text_encoder.pad_token = "!"
  config.diffusion.update(SD_PROCESS)
  default = "v" if config.model.context_dim == 1024 else "epsilon"  # SD 2.x 768-v; pass prediction_type for base
  if prediction_type is not None and prediction_type not in PREDICTIONS:
    raise ConfigError(f"prediction_type={prediction_type!r}: use one of {sorted(PREDICTIONS)}.")
  config.diffusion.mean_type = PREDICTIONS[prediction_type] if prediction_type else default
  config.sample.update({k: v for k, v in SD_SAMPLING.items() if k != "clip_denoised"})
  config.model.init_from = config.autoencoder.init_from = config.text_encoder.init_from = path
  config.text_encoder.tokenizer = tokenizer
  _check_parts(config, shape)
  return config, dict(SD_SCHEDULER, prediction_type="v_prediction" if config.diffusion.mean_type == "v" else "epsilon")


def _check_parts(config, shape: dict):
  """The parts must fit one another: one line naming the mismatch, before any weight is read."""
  m, a, te = config.model, config.autoencoder, config.text_encoder
  if shape["in_channels"] != a.latent_channels:
    raise CheckpointError(f"The autoencoder's latents have {a.latent_channels} channels and the UNet takes "
                          f"{shape['in_channels']}: the parts are of different models.")
  if te.width != m.context_dim:
    raise CheckpointError(f"The text encoder's width is {te.width} and the UNet cross-attends to context_dim="
                          f"{m.context_dim}: the parts are of different models.")


@dataclasses.dataclass
class Pipeline:
  """A loaded text-to-image model: `pipe(prompts, ...)` -> uint8 images [N, H, W, C] (floats in [-1, 1] with
  output="float")."""
  config: ml_collections.ConfigDict
  experiment: object
  params: object
  scheduler_config: dict  # diffusers' scheduler config: its timestep spacing is what each sampler visits
  _programs: dict = dataclasses.field(default_factory=dict)

  def _sampler(self, *, sampler: str, num_steps: int, guidance_scale: float, negative_prompt: str, output: str,
               eta: float):
    from jaxdiff import sampling
    from jaxdiff.convert import scheduler as convert_scheduler
    key = (sampler, num_steps, float(guidance_scale), output, float(eta))
    if key not in self._programs:
      config = ml_collections.ConfigDict(self.config.to_dict())
      s = config.sample
      s.sampler, s.guidance_scale, s.eta = sampler, float(guidance_scale), float(eta)
      if sampler not in convert_scheduler.DEFAULT_SPACING:
        raise ConfigError(f"sampler={sampler!r}: use one of {', '.join(convert_scheduler.DEFAULT_SPACING)}.")
      spacing = convert_scheduler.timestep_spacing(self.scheduler_config, sampler)
      s.timestep_respacing = convert_scheduler.respacing_for(spacing, num_steps)
      from jaxdiff import config_schema
      config_schema.validate(config)  # the prompts are the call's, not the config's
      exp = dataclasses.replace(self.experiment, config=config)
      self._programs[key] = sampling.make_sample_fn(exp, clip_denoised=False, prompts=[""],
                                                    as_float=output == "float")
    fn = self._programs[key]
    fn.set_negative_prompt(negative_prompt)
    return fn

  def __call__(self, prompts, *, negative_prompt: str = "", num_steps: int = 50, guidance_scale: float = 7.5,
               seed: int = 0, sampler: str = "ddim", eta: float = 0.0, output: str = "uint8"):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ConfigError("pipe(prompts): give at least one prompt.")
    if output not in ("uint8", "float"):
      raise ConfigError(f"output={output!r}: use 'uint8' or 'float'.")
    fn = self._sampler(sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                       negative_prompt=negative_prompt, output=output, eta=eta)
    fn.prompts = prompts
    n = len(prompts)
    count = -(-n // jax.device_count()) * jax.device_count()
    from jaxdiff import sampling
    images, _ = sampling.draw_indices(fn, self.params, seed=seed, indices=sampling.pad_to(np.arange(n), count))
    return images[:n]

  def initial_latents(self, n: int, seed: int = 0) -> np.ndarray:
    """The x_T that sample i of `pipe(..., seed=seed)` starts from (to hand to another implementation)."""
    from jaxdiff import sampling
    from jaxdiff.diffusion import samplers
    keys = sampling.sample_keys(seed, jax.numpy.arange(n))
    return np.asarray(samplers.per_sample_normal(samplers.split_keys(keys)[0], self.experiment.diffusion_shape))


def load_pipeline(path: str, *, tokenizer: str | None = None, prediction_type: str | None = None,
                  image_size: int | None = None, dtype: str = "float32") -> Pipeline:
  """A Stable Diffusion 1.x/2.x pipeline from a diffusers folder or a single checkpoint file (see the module doc)."""
  from jaxdiff import weights
  from jaxdiff.train import experiment as experiment_lib
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist: pass a diffusers Stable Diffusion folder or a .ckpt/.safetensors.")
  if os.path.isdir(path):
    if tokenizer or prediction_type or image_size:
      raise ConfigError("tokenizer=, prediction_type= and image_size= are for single files: a folder brings its own.")
    config, scheduler = folder_config(path)
  else:
    if not tokenizer:
      raise ConfigError(f"{path} holds no tokenizer: pass tokenizer=<folder with vocab.json + merges.txt> (the "
                        "tokenizer/ of the model's diffusers folder).")
    config, scheduler = file_config(path, tokenizer=tokenizer, prediction_type=prediction_type,
                                    image_size=image_size)
  config.model.dtype = dtype
  exp = experiment_lib.build(config)  # the prompts come with each call
  params, _ = weights.load(exp, "", use_ema=False)
  exp.frozen_params()  # read the autoencoder and text encoder once, shared by every compiled program
  return Pipeline(config=config, experiment=exp, params=params, scheduler_config=scheduler)
