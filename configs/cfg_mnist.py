"""Classifier-free guidance on the bundled MNIST digits: the main job's class-conditional model, trained with the
class dropped to a learned null class 10% of the time, so one network predicts both halves of the guided eps.

  python train.py --config configs/cfg_mnist.py --workdir runs/mnist_cfg
  python sample.py --config configs/cfg_mnist.py --workdir runs/mnist_cfg --config.sample.guidance_scale=3

5,000 steps (about 9.5 minutes on a 2-core CPU). The README's guidance section shows it at scales 0, 1, 3 and 5
(benchmarks/guidance_demo.py). `:smoke` trains a tiny one for a few steps.
"""

from configs import ddpm_mnist


def get_config(variant=None):
  config = ddpm_mnist.get_config("smoke" if variant == "smoke" else None)
  config.train.cond_drop_prob = 0.1
  if variant is None:
    config.train.num_steps = 5000
  elif variant != "smoke":
    raise ValueError(f"Unknown variant {variant!r} of cfg_mnist: use ':smoke' or nothing.")
  config.sample.timestep_respacing = "100" if variant is None else ""
  return config
