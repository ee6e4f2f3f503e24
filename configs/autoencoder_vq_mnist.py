"""A VQ autoencoder (LDM's VQ-reg: f=4, 3-channel latents, 256 codes) on the bundled MNIST digits, trained as LDM
trains vq-f4 (L1 + codebook loss + patch-GAN with the adaptive weight) at a small size.

  python train.py --config configs/autoencoder_vq_mnist.py --workdir runs/ae_vq_mnist
  python -m jaxdiff.evaluation autoencoder --config configs/autoencoder_vq_mnist.py --workdir runs/ae_vq_mnist

Encoding gives continuous 7x7x3 latents; decoding quantises them to the nearest of 256 codes first. Codebook
perplexity and usage go to TensorBoard. Wall time and held-out PSNR, rFD and judge accuracy are in the README's
autoencoder section. `:smoke` trains a tiny one for a few steps.
"""

from configs import autoencoder_kl_mnist


def get_config(variant=None):
  config = autoencoder_kl_mnist.get_config()
  a = config.autoencoder
  a.kind = "vq"
  a.latent_channels = 3
  a.num_embeddings = 256
  a.embedding_dim = 3
  config.autoencoder_loss.codebook_weight = 1.0
  if variant == "smoke":
    autoencoder_kl_mnist.apply_autoencoder_smoke(config)
    config.autoencoder.num_embeddings = 16
    config.autoencoder.embedding_dim = 2
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of autoencoder_vq_mnist: use ':smoke' or nothing.")
  return config
