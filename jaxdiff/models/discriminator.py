"""The PatchGAN discriminator of pix2pix as taming-transformers and LDM's autoencoder losses use it, and its losses.

Layout (`num_layers` = n): conv 4x4 s2 (bias) + LeakyReLU(0.2); for k = 1..n-1 conv 4x4 s2 to
base * min(2^k, 8) channels (no bias) + BatchNorm + LeakyReLU; conv 4x4 s1 to base * min(2^n, 8) + BatchNorm +
LeakyReLU; conv 4x4 s1 to one logit per patch (bias). All convs pad by 1. Output [B, H', W', 1] logits.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import CheckpointError

Dtype = Any
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default
_PADDING = ((1, 1), (1, 1))
# taming's weights_init: conv weights N(0, 0.02), BN scale N(1, 0.02), BN bias 0.
_CONV_INIT = nn.initializers.normal(0.02)


def _scale_init(key, shape, dtype):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class BatchStatNorm(nn.Module):
  """BatchNorm that always normalises by the current batch's statistics (mean and biased variance over N, H, W),
  computed in float32, with a learned per-channel `scale` and `bias`; returns float32.

  This is torch's BatchNorm2d in training mode without the running averages: LDM only ever runs the discriminator
  in training mode, so they are never read, and leaving them out spares the train step a mutable `batch_stats`
  collection. Under a jit sharded over the batch the statistics are those of the global batch (XLA adds the
  all-reduce); PyTorch DDP, as LDM trains, uses each device's own batch instead.
  """
  eps: float = BN_EPS
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param('scale', _scale_init, (channels,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))  # two-pass, as torch
    return (x - mean) * (jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)) + bias.astype(jnp.float32)


class NLayerDiscriminator(nn.Module):
  """PatchGAN logits [B, H', W', 1] of images [B, H, W, C] (any C; H' = H / 2^num_layers - 2).

  Parameters `conv0`..`conv{n+1}` and `norm1`..`norm{n}`; `convert_discriminator` reads taming's state dict. Conv
  biases (first and last conv only) start at zero, where torch draws them from its default uniform init.
  """
  base_channels: int = 64
  num_layers: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, features, strides, use_bias, name):
    return nn.Conv(features, (4, 4), strides=(strides, strides), padding=_PADDING, use_bias=use_bias,
                   dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_CONV_INIT, name=name)

  @nn.compact
  def __call__(self, x):
    n = self.num_layers
    x = nn.leaky_relu(self._conv(self.base_channels, 2, True, 'conv0')(x), 0.2)
    for k in range(1, n + 1):
      # Stride 2 down to the last hidden conv, which keeps the resolution.
      x = self._conv(self.base_channels * min(2 ** k, 8), 2 if k < n else 1, False, f'conv{k}')(x)
      x = nn.leaky_relu(BatchStatNorm(param_dtype=self.param_dtype, name=f'norm{k}')(x), 0.2)
    return self._conv(1, 1, True, f'conv{n + 1}')(x)


def torch_key(path: tuple[str, ...]) -> str:
  """A discriminator param path -> taming's `main.{i}.*` key (conv k sits at main.{3k-1}, its BatchNorm after it)."""
  layer, leaf = path
  k = int(layer.removeprefix('conv').removeprefix('norm'))
  index = 0 if k == 0 else 3 * k - (1 if layer.startswith('conv') else 0)
  return f'main.{index}.{"bias" if leaf == "bias" else "weight"}'


def convert_discriminator(state_dict: dict, model: NLayerDiscriminator | None = None, *,
                          what: str = 'the discriminator state dict') -> dict:
  """taming's `NLayerDiscriminator` state dict (NumPy or torch arrays, `main.{i}.weight/bias`) -> params, every key
  and shape checked. BatchNorm running statistics are ignored. Without `model`, base_channels and num_layers are
  read from the state dict; the input channels always are (from `main.0.weight`)."""
  # Imported here: the jaxdiff.convert package imports the training stack, which imports this module.
  from jaxdiff.convert import common  # pylint: disable=import-outside-toplevel
  state = {k: np.asarray(v) for k, v in state_dict.items()
           if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))}
  if 'main.0.weight' not in state or np.ndim(state['main.0.weight']) != 4:
    raise CheckpointError(f'{what} has no 4-D main.0.weight: it is not a taming NLayerDiscriminator state dict.')
  width, in_channels = state['main.0.weight'].shape[:2]
  if model is None:
    last = max(int(k.split('.')[1]) for k in state if k.startswith('main.') and k.split('.')[1].isdigit())
    model = NLayerDiscriminator(base_channels=int(width), num_layers=max(1, (last - 2) // 3))
  size = 2 ** (model.num_layers + 2)  # the smallest input that leaves the last conv a pixel
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, in_channels)))['params']
  return common.fill_params(state, shapes, lambda path: [torch_key(path)], what=what)


def hinge_d_loss(logits_real, logits_fake):
  """LDM's hinge discriminator loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
  real, fake = jnp.asarray(logits_real, jnp.float32), jnp.asarray(logits_fake, jnp.float32)
  return 0.5 * (jnp.mean(nn.relu(1.0 - real)) + jnp.mean(nn.relu(1.0 + fake)))


def vanilla_d_loss(logits_real, logits_fake):
  """LDM's non-saturating discriminator loss: 0.5 * (mean(softplus(-real)) + mean(softplus(fake)))."""
  real, fake = jnp.asarray(logits_real, jnp.float32), jnp.asarray(logits_fake, jnp.float32)
  return 0.5 * (jnp.mean(nn.softplus(-real)) + jnp.mean(nn.softplus(fake)))


def generator_loss(logits_fake):
  """The generator's adversarial loss, -mean(logits_fake), as LDM's LPIPSWithDiscriminator."""
  return -jnp.mean(jnp.asarray(logits_fake, jnp.float32))
