"""SDXL 1.0 refiner as a config: its 2.26B-parameter UNet, OpenCLIP ViT-bigG/14 text encoder alone (penultimate
layer as a 1280-wide context, its projected pooled output leading the vector condition), micro-conditioning on the
original size, crop and aesthetic score, and the SDXL VAE; the refiner denoises the last steps of the base's
latents (sample.denoising_start) or an image (sample.strength).

  python sample.py --config configs/sdxl_refiner.py --workdir runs/refiner \\
      --config.model.init_from=sd_xl_refiner_1.0.safetensors --config.autoencoder.init_from=sdxl/vae \\
      --config.text_encoder.init_from=refiner/text_encoder_2 --config.text_encoder.tokenizer=refiner/tokenizer_2 \\
      --config.sample.init_images=runs/sdxl/latents.npz --config.sample.denoising_start=0.8 \\
      --config.sample.prompt="a photo of an astronaut riding a horse"

The UNet (diffusers' UNet2DConditionModel of stabilityai/stable-diffusion-xl-refiner-1.0, SGM's
sd_xl_refiner.yaml): four levels of 384, 768, 1536 and 1536 channels on 128x128 latents, 4 transformer blocks at the
two middle levels and in the middle block, 64 channels per head, linear projections, a 1280-wide context. Its vector
condition (model.adm_in_channels = 2560) is the pooled text embedding followed by 256-wide sinusoids of the original
size (h, w), crop (top, left) and aesthetic score. The released pipeline does not zero the empty prompt
(force_zeros_for_empty_prompt false): the null text is the tokens of "" (latent.text_null='empty_prompt'). Process
and sampling as configs/sdxl_base.py. `:smoke` shrinks every part to a seconds-long CPU run.
"""

from configs import sd15, sdxl_base
from jaxdiff import config_schema


def get_config(variant=None):
  config = sd15.base_config(image_size=1024)
  sdxl_base.apply_sdxl_common(config)
  m = config.model
  m.base_channels = 384
  m.channel_mult = (1, 2, 4, 4)
  m.attention_resolutions = (64, 32)  # levels 1 and 2 of 128x128 latents; the middle block attends too
  m.transformer_depth = 4
  sdxl_base.apply_clip_bigg(config.text_encoder)
  config.text_encoder_2.kind = ""
  m.context_dim = config.text_encoder.width  # 1280
  config.latent.micro_conditioning = ("original_size", "crops_coords_top_left", "aesthetic_score")
  m.adm_in_channels = config_schema.expected_adm_in_channels(config)  # 1280 + 5 x 256 = 2560
  config.latent.text_null = "empty_prompt"
  if variant == "smoke":
    apply_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of sdxl_refiner: use ':smoke' or nothing.")
  return config


def apply_smoke(config):
  """sd15's tiny run with the refiner's structure: a 4-level UNet attending at the two middle levels, one 32-wide
  text encoder with a 32-wide projection, 8-wide micro sinusoids."""
  sd15.apply_smoke(config)
  m = config.model
  m.channel_mult, m.attention_resolutions, m.transformer_depth = (1, 2, 2, 2), (4, 2), 1
  config.text_encoder.projection_dim = 32
  config.latent.micro_embed_dim = 8
  m.adm_in_channels = config_schema.expected_adm_in_channels(config)
  config.data.bucket_multiple = 64  # the latent factor 8 x the UNet's 8
