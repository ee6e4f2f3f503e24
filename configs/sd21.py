"""Stable Diffusion 2.1 (768-v) as a config: its 865.9M-parameter UNet, OpenCLIP ViT-H/14 text encoder (as diffusers
stores it: 23 layers, the last hidden states) and v-prediction process, for 768x768 images.

  python train.py --config configs/sd21.py --workdir runs/sd21 --config.data.data_dir=/path/to/tfds \\
      --config.autoencoder.init_from=v2-1_768-ema-pruned.safetensors \\
      --config.text_encoder.init_from=v2-1_768-ema-pruned.safetensors --config.text_encoder.tokenizer=sd21/tokenizer \\
      --config.model.init_from=v2-1_768-ema-pruned.safetensors

The UNet is SD 1.5's (configs/sd15.py) on 96x96x4 latents (attention at 96, 48, 24) with 64 channels per head,
linear projections and a 1024-wide context; the process predicts v. For the 512px 2.x-base models set
data.image_size=512, model.attention_resolutions=(64, 32, 16) and diffusion.mean_type=epsilon. `:smoke` shrinks
every part to a seconds-long CPU run.
"""

from configs import sd15


def get_config(variant=None):
  config = sd15.base_config(image_size=768)
  sd15.apply_sd_unet(config, latent_size=768 // 8, context_dim=1024, linear=True)
  config.model.num_heads = 1  # unused: heads follow from num_head_channels (5, 10, 20 and 20 per level)
  config.model.num_head_channels = 64
  te = config.text_encoder  # OpenCLIP ViT-H/14's text tower without its last layer (diffusers' CLIPTextModel)
  te.vocab_size, te.width, te.num_layers, te.num_heads, te.max_length = 49408, 1024, 23, 16, 77
  te.activation = "gelu"
  te.output = "last"
  te.projection_dim = 0
  te.eos_token_id = 49407
  te.pad_token = "!"  # OpenCLIP pads with "!" (token 0)
  sd15.apply_sd_process(config, mean_type="v")
  if variant == "smoke":
    sd15.apply_smoke(config)
    config.model.use_linear_projection = True
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of sd21: use ':smoke' or nothing.")
  return config
