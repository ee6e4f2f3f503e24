"""LPIPS v0.1 with the VGG16 trunk (Zhang et al. 2018) in Flax linen, NHWC; the perceptual loss of LDM autoencoders.

The trunk is torchvision's `vgg16().features` (13 3x3 convs with ReLU, 2x2 max pools between the five stages), read
at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3. Each tap is unit-normalised over channels, the squared
difference of the two images' taps goes through a bias-free 1x1 head with one output, and the spatial means of the
five heads are summed. Weights come from two local files: torchvision's VGG16 state dict (`vgg16-397923af.pth`)
and the lpips package's head file (`lpips/weights/v0.1/vgg.pth`); nothing is downloaded.
"""

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import CheckpointError

Dtype = Any

# Output channels of the convs of each VGG16 stage; a 2x2 max pool precedes every stage but the first.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_CHANNELS = tuple(stage[-1] for stage in VGG16_STAGES)
# LPIPS' ScalingLayer: maps [-1, 1] inputs to roughly ImageNet-normalised ones.
SHIFT = (-.030, -.088, -.188)
SCALE = (.458, .448, .450)
EPS = 1e-10  # lpips' normalize_tensor
# float32 out of bf16 operands too: the taps are normalised and differenced in float32.
_F32_OUT_CONV = functools.partial(jax.lax.conv_general_dilated, preferred_element_type=jnp.float32)


def _vgg16_torch_indices() -> dict[str, int]:
  """'conv{stage}_{i}' -> its index in torchvision's vgg16().features (each conv is followed by a ReLU, each stage
  after the last conv by a max pool)."""
  indices, index = {}, 0
  for stage, widths in enumerate(VGG16_STAGES, 1):
    for i in range(1, len(widths) + 1):
      indices[f'conv{stage}_{i}'] = index
      index += 2
    index += 1
  return indices


VGG16_TORCH_INDICES = _vgg16_torch_indices()


class VGG16Features(nn.Module):
  """The five ReLU taps of torchvision's VGG16 feature trunk, each [B, H / 2^s, W / 2^s, C] in float32."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    taps = []
    for stage, widths in enumerate(VGG16_STAGES, 1):
      if stage > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i, width in enumerate(widths, 1):
        x = nn.relu(nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=self.param_dtype,
                            conv_general_dilated=_F32_OUT_CONV, name=f'conv{stage}_{i}')(x))
      taps.append(x)
    return taps


def _unit_normalize(x):
  """x / (||x||_channels + eps) as lpips' normalize_tensor, with a finite gradient where a pixel's features are all
  zero: sqrt'(0) is infinite, and the NaN (0 * inf) it makes in the backward pass is otherwise only hidden by the
  ReLU's mask in front."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return x / (norm + EPS)


class LPIPS(nn.Module):
  """LPIPS distance [B] between two image batches [B, H, W, C] in [-1, 1] (C = 3, or 1 repeated to 3).

  Differentiable (the autoencoder's perceptual loss) and jit-able; the trunk runs in `dtype`, the normalisation, the
  differences and the heads in float32. Parameters: `vgg/conv{s}_{i}/{kernel,bias}` and `lin{k}/kernel` [1,1,C,1].
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    if x.shape != y.shape:
      raise ValueError(f'LPIPS: images of shapes {x.shape} and {y.shape}: both must be the same [B, H, W, C]')
    if x.shape[-1] == 1:
      x, y = (jnp.repeat(v, 3, axis=-1) for v in (x, y))
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'LPIPS takes [B, H, W, 1 or 3] images, got {x.shape}')
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    # One trunk pass over both batches: the convs see twice the batch instead of running twice.
    both = (jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale
    taps = VGG16Features(dtype=self.dtype, param_dtype=self.param_dtype, name='vgg')(both.astype(self.dtype))
    total = 0.0
    for k, (tap, channels) in enumerate(zip(taps, TAP_CHANNELS)):
      fx, fy = jnp.split(_unit_normalize(tap), 2)
      # The init (a plain channel mean) only gives shapes: real heads come from load_lpips_params.
      dist = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                     kernel_init=nn.initializers.constant(1.0 / channels), name=f'lin{k}')(jnp.square(fx - fy))
      total = total + jnp.mean(dist, axis=(1, 2, 3))
    return total


def expected_shapes() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
  """The torch keys and shapes LPIPS reads: (torchvision VGG16 `features.N.*`, lpips heads `lin{k}.model.1.weight`)."""
  vgg, in_channels = {}, 3
  for stage, widths in enumerate(VGG16_STAGES, 1):
    for i, width in enumerate(widths, 1):
      index = VGG16_TORCH_INDICES[f'conv{stage}_{i}']
      vgg[f'features.{index}.weight'] = (width, in_channels, 3, 3)
      vgg[f'features.{index}.bias'] = (width,)
      in_channels = width
  heads = {f'lin{k}.model.1.weight': (1, c, 1, 1) for k, c in enumerate(TAP_CHANNELS)}
  return vgg, heads


def _read(path: str) -> dict[str, np.ndarray]:
  """.pth/.pt (torch.load, weights only), .safetensors, or .npz of the same key names."""
  if not path.endswith('.npz'):
    # Imported here: the jaxdiff.convert package imports the training stack, which imports this module.
    from jaxdiff.convert import common  # pylint: disable=import-outside-toplevel
    return common.read_state_dict(path)
  if not os.path.isfile(path):
    raise CheckpointError(f'No checkpoint file at {path}: check the path.')
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except Exception as e:  # zipfile.BadZipFile, ValueError, OSError on foreign or truncated files
    raise CheckpointError(f'{path} is not a readable .npz of arrays ({type(e).__name__}): re-create it.') from None


def _checked(state: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], path: str, what: str, fix: str):
  missing = sorted(k for k in expected if k not in state)
  misshaped = sorted(f'{k} {tuple(np.shape(state[k]))} (expected {expected[k]})'
                     for k in expected if k in state and tuple(np.shape(state[k])) != expected[k])
  problems = [f'{len(names)} {kind} ({", ".join(names[:3])}{", ..." if len(names) > 3 else ""})'
              for kind, names in (('missing', missing), ('mis-shaped', misshaped)) if names]
  if problems:
    raise CheckpointError(f'{path} is not {what} ({"; ".join(problems)}): {fix}.')
  return {k: np.asarray(state[k], np.float32) for k in expected}


def _hwio(oihw):
  return oihw.transpose(2, 3, 1, 0)


def convert_lpips_state_dicts(vgg_state: dict, heads_state: dict, *, vgg_source: str = 'the VGG16 state dict',
                              heads_source: str = 'the LPIPS head state dict') -> dict:
  """torchvision VGG16 + lpips head state dicts (NumPy arrays) -> the LPIPS params tree, every key and shape
  checked. Keys the network does not use (VGG's `classifier.*`) are ignored."""
  vgg_shapes, head_shapes = expected_shapes()
  vgg = _checked(vgg_state, vgg_shapes, vgg_source, "torchvision's VGG16 state dict",
                 "pass torchvision's vgg16-397923af.pth as vgg_path")
  heads = _checked(heads_state, head_shapes, heads_source, "the lpips v0.1 'vgg' head file",
                   "pass the lpips package's lpips/weights/v0.1/vgg.pth as heads_path")
  params = {'vgg': {}}
  for name, index in VGG16_TORCH_INDICES.items():
    params['vgg'][name] = {'kernel': _hwio(vgg[f'features.{index}.weight']),
                           'bias': vgg[f'features.{index}.bias']}
  for k in range(len(TAP_CHANNELS)):
    params[f'lin{k}'] = {'kernel': _hwio(heads[f'lin{k}.model.1.weight'])}
  return jax.tree.map(jnp.asarray, params)


def load_lpips_params(vgg_path: str, heads_path: str) -> dict:
  """The LPIPS params from torchvision's VGG16 weights and the lpips package's v0.1 'vgg' heads (.pth/.pt,
  .safetensors or .npz with the torch key names). Use as `LPIPS().apply({'params': params}, x, y)`."""
  return convert_lpips_state_dicts(_read(vgg_path), _read(heads_path), vgg_source=vgg_path, heads_source=heads_path)
