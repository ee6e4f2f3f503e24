"""ADM on ImageNet 256x256 (Dhariwal & Nichol, 2021): guided-diffusion's class-conditional 256x256_diffusion.pt.

  python sample.py --config configs/adm_imagenet256.py --config.model.init_from=256x256_diffusion.pt --workdir out

guided-diffusion README flags: 256 channels, mults 1,1,2,2,4,4, 2 res blocks, attention at 32/16/8 with 64 channels
per head (legacy QKV order), BigGAN up/down, scale-shift norm, learned sigma, 1000 classes; linear schedule, T=1000.
The paper trains 1,980k steps at batch 256, Adam 1e-4. For 256x256_diffusion_uncond.pt set
--config.model.class_conditional=False. `:smoke` runs the same options on the bundled digits.
"""

from configs import adm_imagenet64
from configs import default


def get_config(variant=None):
  config = adm_imagenet64.apply_adm(default.get_config(), image_size=256, channels=256,
                                    channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, num_head_channels=64)
  config.train.batch_size = 256
  config.train.num_steps = 1_980_000
  config.train.learning_rate = 1e-4
  if variant == "smoke":
    adm_imagenet64.apply_adm_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of adm_imagenet256: use ':smoke' or nothing.")
  return config
