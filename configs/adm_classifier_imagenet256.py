"""guided-diffusion's 256x256 noisy ImageNet classifier (256x256_classifier.pt): configs/adm_classifier_imagenet64.py at
256x256, the network of configs/adm_imagenet256.py's classifier section.

  python train.py --config configs/adm_classifier_imagenet256.py --workdir runs/adm256_classifier \\
      --config.data.data_dir=/path/to/tfds
"""

from configs import adm_classifier_imagenet64
from configs import adm_imagenet256


def get_config(variant=None):
  return adm_classifier_imagenet64.classifier_job(adm_imagenet256.get_config("smoke" if variant == "smoke" else None),
                                                  variant, "adm_classifier_imagenet256")
