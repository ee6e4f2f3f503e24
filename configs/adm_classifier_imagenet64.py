"""guided-diffusion's 64x64 noisy ImageNet classifier (64x64_classifier.pt), trained with classifier_train's flags.

  python train.py --config configs/adm_classifier_imagenet64.py --workdir runs/adm64_classifier \
      --config.data.data_dir=/path/to/tfds
  python sample.py --config configs/adm_imagenet64.py --config.model.init_from=64x64_diffusion.pt \
      --config.sample.classifier_workdir=runs/adm64_classifier --config.sample.classifier_scale=1.0 --workdir out

The network is configs/adm_imagenet64.py's classifier section (guided-diffusion's CLASSIFIER_FLAGS at 64x64); the
noise schedule is the diffusion model's, which the classifier must share. Training: the README's TRAIN_FLAGS (AdamW
3e-4, weight decay 0.05, learning rate annealed linearly to 0 over 300k steps, batch 256), random crops and flips,
t uniform; loss and accuracy per quarter of t on the validation split. `:smoke` trains a tiny one on the digits.
configs/adm_classifier_imagenet{128,256}.py are the same at their sizes.
"""

from configs import adm_imagenet64
from configs import classifier_mnist


def classifier_job(config, variant, name):
  """An ADM config turned into the training of its noisy classifier, with guided-diffusion's classifier flags."""
  config.job = "classifier"
  config.data.random_crop = True
  config.classifier.eval_split = "validation"
  t = config.train
  t.batch_size = 256
  t.num_steps = 300_000
  t.learning_rate = 3e-4
  t.weight_decay = 0.05
  t.lr_schedule = "linear"
  t.warmup_steps = 0
  t.checkpoint_every = 10_000
  if variant == "smoke":
    classifier_mnist.apply_classifier_smoke(config)
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of {name}: use ':smoke' or nothing.")
  return config


def get_config(variant=None):
  return classifier_job(adm_imagenet64.get_config("smoke" if variant == "smoke" else None), variant,
                        "adm_classifier_imagenet64")
