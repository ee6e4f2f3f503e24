"""ADM on ImageNet 128x128 (Dhariwal & Nichol, 2021): guided-diffusion's class-conditional 128x128_diffusion.pt.

  python sample.py --config configs/adm_imagenet128.py --config.model.init_from=128x128_diffusion.pt --workdir out

guided-diffusion README flags: 256 channels, mults 1,1,2,3,4, 2 res blocks, attention at 32/16/8 with 4 heads
(legacy QKV order), BigGAN up/down, scale-shift norm, learned sigma, 1000 classes; linear schedule, T=1000. The
paper trains 4,360k steps at batch 256, Adam 1e-4. `:smoke` runs the same options on the bundled digits.
"""

from configs import adm_imagenet64
from configs import default


def get_config(variant=None):
  config = adm_imagenet64.apply_adm(default.get_config(), image_size=128, channels=256,
                                    channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2, num_heads=4)
  config.train.batch_size = 256
  config.train.num_steps = 4_360_000
  config.train.learning_rate = 1e-4
  if variant == "smoke":
    adm_imagenet64.apply_adm_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of adm_imagenet128: use ':smoke' or nothing.")
  return config
