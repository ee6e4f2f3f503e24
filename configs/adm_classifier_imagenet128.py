"""guided-diffusion's 128x128 noisy ImageNet classifier (128x128_classifier.pt): configs/adm_classifier_imagenet64.py at
128x128, the network of configs/adm_imagenet128.py's classifier section.

  python train.py --config configs/adm_classifier_imagenet128.py --workdir runs/adm128_classifier \\
      --config.data.data_dir=/path/to/tfds
"""

from configs import adm_classifier_imagenet64
from configs import adm_imagenet128


def get_config(variant=None):
  return adm_classifier_imagenet64.classifier_job(adm_imagenet128.get_config("smoke" if variant == "smoke" else None),
                                                  variant, "adm_classifier_imagenet128")
