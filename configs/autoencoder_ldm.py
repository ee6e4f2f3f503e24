"""The published first stages at full size: LDM's kl-f4/f8/f16/f32 and vq-f4/f8/f16, and the SD 1.x/2.x and SDXL VAEs
(`jaxdiff.models.autoencoder.PUBLISHED_LAYOUTS`), trained with LDM's losses and settings.

  python train.py --config configs/autoencoder_ldm.py:kl-f8 --workdir runs/kl_f8 --config.data.data_dir=/path/to/tfds
  python -m jaxdiff.evaluation autoencoder --config configs/autoencoder_ldm.py:sdxl --workdir out \\
      --config.autoencoder.init_from=/path/to/sdxl-vae  # a diffusers folder or an SD/SDXL checkpoint

KL layouts: L1 + LPIPS + KL (1e-6) and a hinge patch-GAN from step 50,001 with disc_weight 0.5; VQ layouts: L1 +
LPIPS + codebook loss and the GAN from step 0 with disc_weight 0.75 (LDM's vq-f4 config). LDM's learning rate is
4.5e-6 x the global batch. LPIPS needs local VGG16 and lpips weight files (autoencoder_loss.lpips_vgg,
lpips_heads). 256x256 ImageNet by default; any TFDS name or an image folder works. `:smoke` shrinks kl-f8 to seconds.
"""

from configs import default
from jaxdiff.models.autoencoder import PUBLISHED_LAYOUTS

NETWORK_KEYS = ("kind", "base_channels", "channel_mult", "num_res_blocks", "latent_channels", "mid_attention",
                "attention_levels", "norm_groups", "num_embeddings", "embedding_dim", "beta", "scale_factor")


def get_config(layout=None):
  smoke = layout == "smoke"
  layout = "kl-f8" if layout in (None, "smoke") else layout
  if layout not in PUBLISHED_LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r} of autoencoder_ldm: use one of {', '.join(PUBLISHED_LAYOUTS)} or "
                     "':smoke'.")
  kind, section, _ = PUBLISHED_LAYOUTS[layout]
  config = default.get_config()
  config.job = "autoencoder"
  config.data.name, config.data.split, config.data.image_size, config.data.channels = "imagenet2012", "train", 256, 3
  config.data.random_flip = True
  for key in NETWORK_KEYS:
    config.autoencoder[key] = section[key]
  config.autoencoder.eval_split = "validation"

  al, t = config.autoencoder_loss, config.train
  t.batch_size = 16
  t.learning_rate = 4.5e-6 * t.batch_size
  t.warmup_steps = 0
  t.grad_clip = 0.0
  t.adam_b1, t.adam_b2 = 0.5, 0.9
  t.ema_decay = 0.0  # LDM keeps no EMA of its first stages
  t.num_steps = 500_000
  t.sample_every = 5000
  t.checkpoint_every = 5000
  t.num_grid_samples = 8
  al.perceptual_weight = 1.0
  if kind == "kl":
    t.disc_start, al.disc_weight, al.kl_weight = 50_001, 0.5, 1e-6
  else:
    t.disc_start, al.disc_weight, al.codebook_weight = 0, 0.75, 1.0
  if smoke:
    from configs import autoencoder_kl_mnist
    config.data.name, config.data.split, config.data.image_size, config.data.channels = (
        "sklearn_digits", "train", 16, 1)
    config.autoencoder.eval_split = ""
    al.perceptual_weight = 0.0
    autoencoder_kl_mnist.apply_autoencoder_smoke(config)
  return config
