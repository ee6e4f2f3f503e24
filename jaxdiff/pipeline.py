"""Text-to-image pipelines for notebooks: a Stable Diffusion 1.x/2.x or SDXL (base or refiner) model from a local
folder or file, sampled with the same jitted programs as sample.py.

  import jaxdiff
  pipe = jaxdiff.load_pipeline("stable-diffusion-v1-5")            # a diffusers folder (model_index.json)
  images = pipe(["a photo of an astronaut riding a horse"], num_steps=25, guidance_scale=7.5, seed=0)  # uint8

A folder is read as diffusers saves a StableDiffusion(XL)Pipeline: unet/, vae/, text_encoder/, tokenizer/ (SDXL also
text_encoder_2/ and tokenizer_2/; its refiner only those) and scheduler/scheduler_config.json (its training process
becomes the diffusion config; its timestep spacing, offset and final alpha are what DDIM and DPM-Solver++ use).
A single CompVis/Stability checkpoint (.ckpt read with weights_only=True, or .safetensors) holds the UNet, the
autoencoder and the text encoder(s); its tokenizer is a separate folder (`tokenizer=`) and its scheduler is Stable
Diffusion's (scaled-linear betas, eps for SD 1.x, v for SD 2.x unless `prediction_type=` says otherwise); an SDXL
file's second tokenizer is `tokenizer_2=` (a refiner file's one text encoder reads `tokenizer=`). Each (batch size,
sampler, steps, guidance scale, size, strength, denoising range) compiles once; prompts, the negative prompt, the
micro-conditioning, the init images and the seed are arguments of the compiled program.
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
SDXL_SCALE_FACTOR = 0.13025
# SDXL's micro-conditioning, by the number of scalars the UNet's vector holds besides the pooled text: the base's
# sizes and crop, the refiner's with an aesthetic score instead of the target size.
SDXL_MICRO = {6: ("original_size", "crops_coords_top_left", "target_size"),
              5: ("original_size", "crops_coords_top_left", "aesthetic_score")}


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
  present = lambda name: isinstance(index.get(name), list) and index[name][0] is not None
  encoders = [n for n in ("text_encoder", "text_encoder_2") if present(n)]
  needed = ["unet", "vae", "scheduler"] + [n.replace("text_encoder", "tokenizer") for n in encoders] + encoders
  for name in needed if encoders else needed + ["text_encoder"]:
    if not present(name) or not os.path.isdir(part(name)):
      raise CheckpointError(f"{folder} has no {name}/: jaxdiff loads text-to-image folders with unet/, vae/, "
                            "text_encoder/ (and text_encoder_2/ for SDXL), their tokenizers and scheduler/ "
                            "(StableDiffusion(XL)Pipeline.save_pretrained).")
  config = _base_config()
  unet_section, shape = sd_unet.folder_section(part("unet"))
  config.model.update(unet_section)
  vae_cfg = _read_json(part("vae/config.json"))
  ae_section, channels = convert_autoencoder.folder_section(vae_cfg, part("vae"))
  config.autoencoder.update(ae_section)
  config.autoencoder.scale_factor = float(vae_cfg.get("scaling_factor", SD_SCALE_FACTOR))
  config.data.channels = channels
  config.data.image_size = shape["image_size"] * 2 ** (len(config.autoencoder.channel_mult) - 1)
  for section, name in zip(("text_encoder", "text_encoder_2"), encoders):
    config[section].update(convert_clip.folder_section(_read_json(part(f"{name}/config.json")), part(name)))
    config[section].init_from = part(name)
    config[section].tokenizer = part(name.replace("text_encoder", "tokenizer"))
  if config.model.adm_in_channels:  # SDXL: penultimate hidden states, the last encoder's pooled output, sizes
    _sdxl_conditioning(config, micro_embed_dim=shape["micro_embed_dim"],
                       zeros=index.get("force_zeros_for_empty_prompt", True))
  scheduler = _read_json(part("scheduler/scheduler_config.json"))
  diffusion, sample = convert_scheduler.sampling_from_scheduler_config(scheduler)
  config.diffusion.update(diffusion)
  config.sample.update({k: v for k, v in sample.items() if k in ("steps_offset", "set_alpha_to_one")})
  config.model.init_from = part("unet")
  config.autoencoder.init_from = part("vae")
  _check_parts(config, shape)
  return config, scheduler


def _sdxl_conditioning(config, *, micro_embed_dim: int | None, zeros: bool):
  """An SDXL UNet's conditioning: both encoders' penultimate hidden states, the last one's projected pooled output
  and the micro-conditioning its vector width implies."""
  lat, m = config.latent, config.model
  sections = [config.text_encoder] + ([config.text_encoder_2] if config.text_encoder_2.kind else [])
  for section in sections:
    section.output = "penultimate"
  last = sections[-1]
  micro = m.adm_in_channels - (last.projection_dim or last.width)
  # A folder states the sinusoid width; a single file does not: the base (two encoders) has 6 scalars, the refiner 5.
  lat.micro_embed_dim = micro_embed_dim or micro // (6 if len(sections) == 2 else 5)
  scalars, rest = divmod(micro, max(lat.micro_embed_dim, 1))
  if rest or scalars not in SDXL_MICRO or lat.micro_embed_dim % 2:
    raise CheckpointError(f"The UNet's vector condition has {m.adm_in_channels} channels, which is not the last text "
                          f"encoder's pooled width plus SDXL's 5 or 6 micro-conditioning scalars of an "
                          f"even width: the parts are of different models.")
  lat.micro_conditioning = SDXL_MICRO[scalars]
  lat.text_null = "zeros" if zeros else "empty_prompt"


def file_config(path: str, *, tokenizer: str | None = None, tokenizer_2: str | None = None,
                prediction_type: str | None = None, image_size: int | None = None):
  """The config of a single-file SD 1.x/2.x or SDXL checkpoint (UNet, first stage and text encoders in one state
  dict); `image_size` defaults to the model's (512, 768 for SD 2.x 768-v, 1024 for SDXL)."""
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
  count = convert_clip.text_encoder_count(state)
  sections = ("text_encoder", "text_encoder_2")[:count]
  for index, section in enumerate(sections):
    config[section].update(convert_clip.section_from_state_dict(state, what=path, index=index))
    if config[section].activation == "gelu":  # OpenCLIP (SD 2.x, SDXL's bigG) pads with "!"
      config[section].pad_token = "!"
    config[section].init_from = path
  config.text_encoder.tokenizer = tokenizer
  if count > 1:
    config.text_encoder_2.tokenizer = tokenizer_2
  if config.model.adm_in_channels:
    config.autoencoder.scale_factor = SDXL_SCALE_FACTOR
    # diffusers' SDXL base zeroes the empty prompt, its refiner does not
    _sdxl_conditioning(config, micro_embed_dim=None, zeros=count > 1)
  config.diffusion.update(SD_PROCESS)
  default = "v" if config.model.context_dim == 1024 else "epsilon"  # SD 2.x 768-v; pass prediction_type for base
  if prediction_type is not None and prediction_type not in PREDICTIONS:
    raise ConfigError(f"prediction_type={prediction_type!r}: use one of {sorted(PREDICTIONS)}.")
  config.diffusion.mean_type = PREDICTIONS[prediction_type] if prediction_type else default
  config.sample.update({k: v for k, v in SD_SAMPLING.items() if k != "clip_denoised"})
  config.model.init_from = config.autoencoder.init_from = path
  _check_parts(config, shape)
  return config, dict(SD_SCHEDULER, prediction_type="v_prediction" if config.diffusion.mean_type == "v" else "epsilon")


def _check_parts(config, shape: dict):
  """The parts must fit one another: one line naming the mismatch, before any weight is read."""
  m, a, te = config.model, config.autoencoder, config.text_encoder
  if shape["in_channels"] != a.latent_channels:
    raise CheckpointError(f"The autoencoder's latents have {a.latent_channels} channels and the UNet takes "
                          f"{shape['in_channels']}: the parts are of different models.")
  width = te.width + (config.text_encoder_2.width if config.text_encoder_2.kind else 0)
  if width != m.context_dim:
    raise CheckpointError(f"The text encoders' width is {width} and the UNet cross-attends to context_dim="
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
               eta: float, **shape_and_steps):
    from jaxdiff import sampling
    from jaxdiff.convert import scheduler as convert_scheduler
    key = (sampler, num_steps, float(guidance_scale), output, float(eta), *sorted(shape_and_steps.items()))
    if key not in self._programs:
      config = ml_collections.ConfigDict(self.config.to_dict())
      s = config.sample
      s.sampler, s.guidance_scale, s.eta = sampler, float(guidance_scale), float(eta)
      s.update(shape_and_steps)
      if sampler not in convert_scheduler.DEFAULT_SPACING:
        raise ConfigError(f"sampler={sampler!r}: use one of {', '.join(convert_scheduler.DEFAULT_SPACING)}.")
      spacing = convert_scheduler.timestep_spacing(self.scheduler_config, sampler)
      s.timestep_respacing = convert_scheduler.respacing_for(spacing, num_steps)
      from jaxdiff import config_schema
      config_schema.validate(config)  # the prompts are the call's, not the config's
      exp = dataclasses.replace(self.experiment, config=config)
      self._programs[key] = sampling.make_sample_fn(exp, clip_denoised=False, prompts=[""], output=output)
    fn = self._programs[key]
    fn.set_negative_prompt(negative_prompt)
    return fn

  def __call__(self, prompts, *, negative_prompt: str = "", num_steps: int = 50, guidance_scale: float = 7.5,
               seed: int = 0, sampler: str = "ddim", eta: float = 0.0, output: str = "uint8", height: int = 0,
               width: int = 0, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
               aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, image=None, strength: float = 1.0,
               denoising_start: float = 0.0, denoising_end: float = 1.0):
    """Images of the prompts (sample i: prompts[i]); `output` "uint8", "float" in [-1, 1] or "latents" (undecoded:
    with denoising_end < 1, the latents a refiner continues from). SDXL: `height` x `width` (0: the model's size),
    the micro-conditioning (original_size / target_size default to (height, width)) and the refiner's aesthetic
    scores. img2img: `image` (uint8 [N, H, W, C] images, or float latents [N, h, w, c]; sample i starts from
    image[i mod N]) noised to `strength` (SDEdit), or latents continued from `denoising_start` as they are."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ConfigError("pipe(prompts): give at least one prompt.")
    from jaxdiff import sampling
    if output not in sampling.OUTPUTS:
      raise ConfigError(f"output={output!r}: use one of {', '.join(sampling.OUTPUTS)}.")
    fn = self._sampler(sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                       negative_prompt=negative_prompt, output=output, eta=eta, height=int(height), width=int(width),
                       strength=float(strength), denoising_start=float(denoising_start or 0.0),
                       denoising_end=float(denoising_end or 1.0))
    height, width, _ = fn.sample_shape
    fn.set_micro_conditioning(original_size=tuple(original_size or (height, width)),
                              crops_coords_top_left=tuple(crops_coords_top_left),
                              target_size=tuple(target_size or (height, width)), aesthetic_score=aesthetic_score,
                              negative_aesthetic_score=negative_aesthetic_score)
    if fn.partial != (image is not None):
      raise ConfigError("img2img: pass image= together with strength < 1 or denoising_start > 0, and not otherwise.")
    fn.set_init(image)
    fn.prompts = prompts
    n = len(prompts)
    count = -(-n // jax.device_count()) * jax.device_count()
    images, _ = sampling.draw_indices(fn, self.params, seed=seed, indices=sampling.pad_to(np.arange(n), count))
    return images[:n]

  def initial_latents(self, n: int, seed: int = 0, *, height: int = 0, width: int = 0) -> np.ndarray:
    """The x_T that sample i of `pipe(..., seed=seed)` starts from (to hand to another implementation); it is also
    the noise img2img adds to sample i's init."""
    from jaxdiff import sampling
    from jaxdiff.diffusion import samplers
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.sample.height, config.sample.width = int(height), int(width)
    shape = dataclasses.replace(self.experiment, config=config).diffusion_shape
    keys = sampling.sample_keys(seed, jax.numpy.arange(n))
    return np.asarray(samplers.per_sample_normal(samplers.split_keys(keys)[0], shape))


def load_pipeline(path: str, *, tokenizer: str | None = None, tokenizer_2: str | None = None,
                  prediction_type: str | None = None, image_size: int | None = None,
                  dtype: str = "float32") -> Pipeline:
  """A Stable Diffusion 1.x/2.x or SDXL pipeline from a diffusers folder or a single checkpoint file (see the module
  doc)."""
  from jaxdiff import weights
  from jaxdiff.train import experiment as experiment_lib
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist: pass a diffusers Stable Diffusion folder or a .ckpt/.safetensors.")
  if os.path.isdir(path):
    if tokenizer or tokenizer_2 or prediction_type or image_size:
      raise ConfigError("tokenizer=, tokenizer_2=, prediction_type= and image_size= are for single files: a folder "
                        "brings its own.")
    config, scheduler = folder_config(path)
  else:
    if not tokenizer:
      raise ConfigError(f"{path} holds no tokenizer: pass tokenizer=<folder with vocab.json + merges.txt> (the "
                        "tokenizer/ of the model's diffusers folder).")
    config, scheduler = file_config(path, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                    prediction_type=prediction_type, image_size=image_size)
  config.model.dtype = dtype
  exp = experiment_lib.build(config)  # the prompts come with each call
  params, _ = weights.load(exp, "", use_ema=False)
  exp.frozen_params()  # read the autoencoder and text encoder once, shared by every compiled program
  return Pipeline(config=config, experiment=exp, params=params, scheduler_config=scheduler)
