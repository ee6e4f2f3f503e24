"""Stable Diffusion 1.5 (Rombach et al., 2022) as a config: its 859.5M-parameter UNet, CLIP ViT-L/14 text encoder
and training process, for fine-tuning or training that network on 512x512 images.

  python train.py --config configs/sd15.py --workdir runs/sd15 --config.data.data_dir=/path/to/tfds \\
      --config.autoencoder.init_from=v1-5-pruned-emaonly.safetensors \\
      --config.text_encoder.init_from=v1-5-pruned-emaonly.safetensors --config.text_encoder.tokenizer=sd15/tokenizer \\
      --config.model.init_from=v1-5-pruned-emaonly.safetensors   # or a diffusers unet/ folder; unset: from scratch

The UNet runs on the 64x64x4 latents of the frozen KL-f8 autoencoder (data.image_size // 8), so its
attention_resolutions are latent sizes: one spatial transformer at 64, 32 and 16, 8 heads of 40/80/160 channels,
1x1-conv projections, cross-attending to the 77 x 768 last hidden states of the text encoder. Process: 1000 steps,
scaled_linear betas 0.00085..0.012, epsilon prediction; captions are dropped 10% of the time for classifier-free
guidance. Sampling from converted weights alone: configs/stable_diffusion.py. `:smoke` shrinks every part to a
seconds-long CPU run.
"""

from configs import default


def apply_sd_unet(config, *, latent_size: int, context_dim: int, linear: bool):
  """The UNet of SD 1.x/2.x (diffusers' UNet2DConditionModel defaults) at `latent_size` latents; heads are set by
  the caller."""
  m = config.model
  m.base_channels = 320
  m.channel_mult = (1, 2, 4, 4)
  m.num_res_blocks = 2
  m.attention_resolutions = (latent_size, latent_size // 2, latent_size // 4)
  m.transformer_depth = 1
  m.context_dim = context_dim
  m.use_linear_projection = linear
  m.legacy_qkv_order = False
  m.use_scale_shift_norm = False
  m.resblock_updown = False
  m.dropout = 0.0
  m.norm_groups = 32
  # LDM's openaimodel layout: [cos, sin] embedding without shift, GroupNorm eps 1e-5, torch conv padding.
  m.norm_eps = 1e-5
  m.flip_sin_to_cos = True
  m.freq_shift = 0
  m.downsample_padding = "symmetric"
  m.mid_block_scale_factor = 1.0


def apply_sd_process(config, *, mean_type: str):
  d = config.diffusion
  d.num_timesteps = 1000
  d.schedule = "scaled_linear"
  d.beta_start, d.beta_end = 0.00085, 0.012
  d.mean_type = mean_type
  d.var_type = "fixed_small"  # LDM's DDPM posterior variance (diffusers' DDPMScheduler default for SD)


def base_config(*, image_size: int):
  """What SD 1.x and 2.x share: text-conditioned latent diffusion on RGB images, DDIM 50 steps at guidance 7.5."""
  config = default.get_config()
  config.job = "latent_diffusion"
  config.latent.condition = "text"
  config.data.image_size = image_size
  config.data.channels = 3
  config.data.random_flip = False
  config.data.captions = "text"
  config.text_encoder.kind = "clip"
  config.autoencoder.scale_factor = 0.18215  # SD's latent scale
  t = config.train
  t.batch_size = 256
  t.learning_rate = 1e-4
  t.warmup_steps = 10_000
  t.ema_decay = 0.9999
  t.cond_drop_prob = 0.1
  s = config.sample
  s.clip_denoised = False
  s.sampler = "ddim"
  s.timestep_respacing = "leading50"
  s.steps_offset = 1
  s.set_alpha_to_one = False
  s.guidance_scale = 7.5
  return config


def get_config(variant=None):
  config = base_config(image_size=512)
  apply_sd_unet(config, latent_size=512 // 8, context_dim=768, linear=False)
  config.model.num_heads = 8
  config.model.num_head_channels = -1
  te = config.text_encoder  # CLIP ViT-L/14 (OpenAI), as transformers' CLIPTextModel holds it
  te.vocab_size, te.width, te.num_layers, te.num_heads, te.max_length = 49408, 768, 12, 12, 77
  te.activation = "quick_gelu"
  te.output = "last"
  te.projection_dim = 0
  te.eos_token_id = 49407
  te.pad_token = ""  # the tokenizer folder's: <|endoftext|>
  apply_sd_process(config, mean_type="epsilon")
  if variant == "smoke":
    apply_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of sd15: use ':smoke' or nothing.")
  return config


def apply_smoke(config):
  """Every part tiny (a 2-level UNet on 8x8 latents of 64x64 images, a 2-layer text encoder), a few steps."""
  m = config.model
  m.base_channels, m.channel_mult, m.num_res_blocks, m.norm_groups = 32, (1, 2), 1, 8
  m.attention_resolutions = (8, 4)
  m.num_heads, m.num_head_channels = 4, -1
  config.data.image_size = 64
  te = config.text_encoder
  te.width = m.context_dim = 32
  te.num_layers, te.num_heads = 2, 4
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps = 2, 2, 1
  t.log_every = t.checkpoint_every = 1
  t.sample_every = 0
  s = config.sample
  s.timestep_respacing, s.num_samples, s.per_device_batch_size = "leading4", 2, 2
