"""SDXL 1.0 base (Podell et al., 2023) as a config: its 2.57B-parameter UNet, the two text encoders (CLIP ViT-L/14 and
OpenCLIP ViT-bigG/14, penultimate layers concatenated to a 2048-wide context; bigG's projected pooled output leads
the vector condition), micro-conditioning on the original size, crop and target size, and the SDXL VAE, for
fine-tuning or training that network on 1024x1024 images.

  python train.py --config configs/sdxl_base.py --workdir runs/sdxl --config.data.name=image_folder \\
      --config.data.image_dir=/path/to/images \\
      --config.autoencoder.init_from=sd_xl_base_1.0.safetensors \\
      --config.text_encoder.init_from=sdxl/text_encoder --config.text_encoder.tokenizer=sdxl/tokenizer \\
      --config.text_encoder_2.init_from=sdxl/text_encoder_2 --config.text_encoder_2.tokenizer=sdxl/tokenizer_2 \\
      --config.model.init_from=sd_xl_base_1.0.safetensors  # or a diffusers unet/ folder; unset: from scratch

The UNet (diffusers' UNet2DConditionModel of stabilityai/stable-diffusion-xl-base-1.0, SGM's sd_xl_base.yaml) runs
on the 128x128x4 latents of the frozen VAE: three levels of 320, 640 and 1280 channels, no attention at the first,
2 and 10 transformer blocks at the others (and 10 in the middle), 64 channels per head, linear projections. Its
vector condition (model.adm_in_channels = 2816) is bigG's 1280-wide pooled text embedding followed by 256-wide
sinusoids of the original size (h, w), crop (top, left) and target size (h, w); a dropped caption is a zero context
and pooled embedding (latent.text_null='zeros', SGM's). Images are fitted to aspect-ratio buckets of about 1024^2
pixels with random crops, as SDXL was trained. Process: 1000 steps, scaled_linear 0.00085..0.012, epsilon; sampling
as SDXL's scheduler (leading spacing, steps_offset 1) with DDIM at guidance 5. Training the full network needs
accelerators with sharded state (mesh.fsdp, model.remat, bfloat16 compute: benchmarks/sdxl_memory.py). `:smoke`
shrinks every part to a seconds-long CPU run.
"""

from configs import sd15
from jaxdiff import config_schema

SDXL_VAE_SCALE = 0.13025  # the SDXL VAE's latent scale (SD's is 0.18215)


def apply_sdxl_common(config):
  """What the SDXL base and refiner share: SD's UNet blocks at 128x128 latents with 64-channel heads and linear
  projections, the SDXL VAE, SD's process, micro-conditioning sinusoids of 256 and SDXL's sampling settings."""
  config.data.image_size = 1024
  sd15.apply_sd_unet(config, latent_size=1024 // 8, context_dim=0, linear=True)  # levels and context: the caller's
  config.model.num_heads = 1  # unused: heads follow from num_head_channels
  config.model.num_head_channels = 64
  config.autoencoder.scale_factor = SDXL_VAE_SCALE  # the defaults are SD's kl-f8 layout, which the SDXL VAE shares
  config.latent.micro_embed_dim = 256
  # SDXL was trained on aspect-ratio buckets with random crops, which its crop micro-conditioning records.
  config.data.crop = "random"
  config.data.multi_aspect = True
  config.data.bucket_multiple = 64
  sd15.apply_sd_process(config, mean_type="epsilon")
  config.sample.guidance_scale = 5.0  # diffusers' StableDiffusionXLPipeline default


def apply_clip_l(te):
  """OpenAI CLIP ViT-L/14's text transformer, penultimate layer (SDXL's first text encoder)."""
  te.kind = "clip"
  te.vocab_size, te.width, te.num_layers, te.num_heads, te.max_length = 49408, 768, 12, 12, 77
  te.activation = "quick_gelu"
  te.output = "penultimate"
  te.projection_dim = 0
  te.eos_token_id = 49407
  te.pad_token = ""  # the tokenizer folder's: <|endoftext|>


def apply_clip_bigg(te):
  """OpenCLIP ViT-bigG/14's text transformer, penultimate layer, with its 1280-wide projection of the pooled output
  (diffusers' CLIPTextModelWithProjection)."""
  te.kind = "clip"
  te.vocab_size, te.width, te.num_layers, te.num_heads, te.max_length = 49408, 1280, 32, 20, 77
  te.activation = "gelu"
  te.output = "penultimate"
  te.projection_dim = 1280
  te.eos_token_id = 49407
  te.pad_token = "!"  # OpenCLIP pads with "!" (token 0)


def get_config(variant=None):
  config = sd15.base_config(image_size=1024)
  apply_sdxl_common(config)
  m = config.model
  m.channel_mult = (1, 2, 4)
  m.attention_resolutions = (64, 32)  # levels 1 and 2 of 128x128 latents; level 0 has no attention
  with m.ignore_type():  # a depth per level where the default holds one int
    m.transformer_depth = (0, 2, 10)  # the middle block takes the last level's 10
  apply_clip_l(config.text_encoder)
  apply_clip_bigg(config.text_encoder_2)
  m.context_dim = config.text_encoder.width + config.text_encoder_2.width  # 2048
  config.latent.micro_conditioning = ("original_size", "crops_coords_top_left", "target_size")
  m.adm_in_channels = config_schema.expected_adm_in_channels(config)  # 1280 + 6 x 256 = 2816
  config.latent.text_null = "zeros"  # SGM's dropped caption; diffusers' force_zeros_for_empty_prompt
  if variant == "smoke":
    apply_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of sdxl_base: use ':smoke' or nothing.")
  return config


def apply_smoke(config):
  """sd15's tiny run with SDXL's structure: a 3-level UNet without attention at the first level, two 32-wide text
  encoders (context 64), 8-wide micro sinusoids."""
  sd15.apply_smoke(config)
  m = config.model
  m.channel_mult, m.attention_resolutions = (1, 2, 2), (4, 2)
  with m.ignore_type():
    m.transformer_depth = (0, 1, 2)
  te2 = config.text_encoder_2
  te2.width, te2.num_layers, te2.num_heads, te2.projection_dim = 32, 2, 4, 32
  m.context_dim = config.text_encoder.width + te2.width
  config.latent.micro_embed_dim = 8
  m.adm_in_channels = config_schema.expected_adm_in_channels(config)
  config.data.bucket_multiple = 32  # the latent factor 8 x the UNet's 4
