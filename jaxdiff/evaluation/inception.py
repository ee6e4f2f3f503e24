"""The Inception-v3 network of pytorch-fid (the TF FID graph's weights) in Flax linen, NHWC.

It reproduces pytorch-fid's `InceptionV3` with `use_fid_inception=True`: torchvision's Inception-v3 with the
FID variants of the A, C and E blocks (average pools that ignore padding, a max pool in the last E block) and a
1008-way classifier. Weights are read from a local copy of `pt_inception-2015-12-05-6726825d.pth` (or the same
state dict as `.safetensors` or `.npz`); nothing is downloaded.
"""

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import CheckpointError, UserError

WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}'
WEIGHTS_ENV = 'JAXDIFF_INCEPTION_WEIGHTS'
# Searched in order when neither a path nor the environment variable names the file; the second is where
# pytorch-fid itself caches the download.
DEFAULT_WEIGHTS_PATHS = (
    os.path.join('~', '.cache', 'jaxdiff', WEIGHTS_FILE),
    os.path.join('~', '.cache', 'torch', 'hub', 'checkpoints', WEIGHTS_FILE),
)
FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
# In the state dict but unused: the IS references take logits without the classifier bias (below).
_UNUSED_KEYS = ('fc.bias',)


class ConvBN(nn.Module):
  """Convolution without bias, batch norm with the stored statistics, ReLU (torchvision's BasicConv2d)."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.strides, padding=[(p, p) for p in self.padding],
                use_bias=False, dtype=self.dtype, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TF's average pool divides by the number of real pixels under the window, not 9.
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    b1 = conv(64, (1, 1), name='branch1x1')(x)
    b5 = conv(48, (1, 1), name='branch5x5_1')(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    b3 = conv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name='branch1x1')(x)
    b7 = conv(c7, (1, 1), name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
    for i, (features, kernel, padding) in enumerate([(c7, (7, 1), (3, 0)), (c7, (1, 7), (0, 3)),
                                                     (c7, (7, 1), (3, 0)), (192, (1, 7), (0, 3))]):
      bd = conv(features, kernel, padding=padding, name=f'branch7x7dbl_{i + 2}')(bd)
    bp = conv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    b3 = conv(192, (1, 1), name='branch3x3_1')(x)
    b3 = conv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = conv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """The E block; the FID graph's last one (Mixed_7c) max-pools its pool branch instead of averaging."""
  max_pool: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)

    def split_1x3_3x1(y, prefix):
      return [conv(384, (1, 3), padding=(0, 1), name=f'{prefix}a')(y),
              conv(384, (3, 1), padding=(1, 0), name=f'{prefix}b')(y)]

    b1 = conv(320, (1, 1), name='branch1x1')(x)
    b3 = split_1x3_3x1(conv(384, (1, 1), name='branch3x3_1')(x), 'branch3x3_2')
    bd = conv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = split_1x3_3x1(conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd), 'branch3x3dbl_3')
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = conv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """images f32[B, H, W, 3] in [-1, 1] -> {'pool': f32[B, 2048], 'logits': f32[B, 1008]}.

  Images are resized bilinearly to `resize_to` (as torch's `interpolate(align_corners=False)`, no
  antialiasing) unless it is None. `pool` is the pool3 feature FID uses; `logits` are pool3 times the
  classifier matrix, without its bias, which is what the Inception Score references (improved-GAN, the
  guided-diffusion evaluator, torch-fidelity) take the softmax of.
  """
  resize_to: int | None = INPUT_SIZE
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    x = images.astype(self.dtype)
    if self.resize_to is not None:
      size = (x.shape[0], self.resize_to, self.resize_to, x.shape[-1])
      x = jax.image.resize(x, size, 'bilinear', antialias=False)
    x = conv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(pool_features, dtype=self.dtype, name=name)(x)
    x = InceptionB(dtype=self.dtype, name='Mixed_6a')(x)
    for name, channels_7x7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(channels_7x7, dtype=self.dtype, name=name)(x)
    x = InceptionD(dtype=self.dtype, name='Mixed_7a')(x)
    x = InceptionE(dtype=self.dtype, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, dtype=self.dtype, name='Mixed_7c')(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, use_bias=False, name='fc')(pool)
    return {'pool': pool, 'logits': logits}


# Flax leaf name -> torch name. Kernels change layout: conv [kh, kw, in, out] <- [out, in, kh, kw], dense
# [in, out] <- [out, in].
_TORCH_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}


def _flax_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T if value.ndim == 2 else value


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape))


def _torch_name(path) -> str:
  keys = [k.key for k in path]  # ('params' | 'batch_stats', module..., leaf)
  return '.'.join(keys[1:-1] + [_TORCH_LEAF[keys[-1]]])


@functools.cache
def abstract_variables() -> dict:
  """Shapes and dtypes of the network's variables ({'params', 'batch_stats'}), without computing them."""
  model = InceptionV3(resize_to=None)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.float32))


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """Every key of pytorch-fid's FID Inception state dict and its shape (the optional BN counters aside)."""
  shapes = {_torch_name(path): _torch_shape(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_variables())}
  shapes.update({key: (NUM_CLASSES,) for key in _UNUSED_KEYS})
  return shapes


def _summary(names, limit=4) -> str:
  names = sorted(names)
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def convert_state_dict(state_dict: dict[str, Any], source: str = 'the state dict') -> dict:
  """pytorch-fid's FID Inception state dict (numpy or torch arrays) -> Flax variables, every key and shape checked."""
  expected = expected_state_dict_shapes()
  # BatchNorm step counters are training state; some exports have them, some do not.
  given = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  missing = expected.keys() - given.keys()
  unexpected = given.keys() - expected.keys()
  if missing or unexpected:
    problems = ([f'missing {_summary(missing)}'] if missing else []) + (
        [f'unexpected {_summary(unexpected)}'] if unexpected else [])
    raise CheckpointError(f'{source} is not the FID Inception state dict ({"; ".join(problems)}); use '
                          f'{WEIGHTS_FILE} from {WEIGHTS_URL}.')
  arrays = {}
  for key, shape in expected.items():
    value = np.asarray(given[key], dtype=np.float32)
    if value.shape != shape:
      raise CheckpointError(f'{source}: {key} has shape {value.shape}, expected {shape}; use '
                            f'{WEIGHTS_FILE} from {WEIGHTS_URL}.')
    arrays[key] = value

  def leaf(path, _):
    return jnp.asarray(_flax_layout(arrays[_torch_name(path)]))

  return jax.tree_util.tree_map_with_path(leaf, abstract_variables())


def resolve_weights_path(path: str | None = None) -> str:
  """The weights file: `path`, else $JAXDIFF_INCEPTION_WEIGHTS, else the first of DEFAULT_WEIGHTS_PATHS that exists."""
  how = (f'download {WEIGHTS_URL} and pass --weights=PATH, set {WEIGHTS_ENV}=PATH, or put it at '
         f'{DEFAULT_WEIGHTS_PATHS[0]}')
  if path or os.environ.get(WEIGHTS_ENV):
    path = os.path.expanduser(path or os.environ[WEIGHTS_ENV])
    if not os.path.isfile(path):
      raise CheckpointError(f'Inception weights {path} not found: {how}.')
    return path
  for candidate in DEFAULT_WEIGHTS_PATHS:
    if os.path.isfile(os.path.expanduser(candidate)):
      return os.path.expanduser(candidate)
  raise CheckpointError(f'no Inception weights ({WEIGHTS_FILE}) given: {how}.')


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict as numpy arrays from a torch `.pth` (read with `weights_only=True`, so no code runs), a
  `.safetensors` file or an `.npz` of the same keys (both readable without torch)."""
  try:
    if path.endswith('.npz'):
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    if path.endswith('.safetensors'):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      return load_file(path)
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise UserError(f'reading {path} needs PyTorch: `pip install torch==2.13.0`, or convert the state dict '
                      'to .safetensors on a machine that has it.') from None
    state_dict = torch.load(path, map_location='cpu', weights_only=True)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    reason = ' '.join(str(e).split())[:200] or type(e).__name__
    raise CheckpointError(f'cannot read Inception weights {path} ({reason}); download {WEIGHTS_URL} '
                          'again.') from None
  if not isinstance(state_dict, dict):
    raise CheckpointError(f'{path} holds a {type(state_dict).__name__}, not a state dict; use {WEIGHTS_FILE} '
                          f'from {WEIGHTS_URL}.')
  return {k: v.float().numpy() if hasattr(v, 'numpy') else np.asarray(v) for k, v in state_dict.items()}


def load_variables(path: str | None = None) -> dict:
  """Flax variables of the FID Inception from a local weights file (see `resolve_weights_path`)."""
  path = resolve_weights_path(path)
  return convert_state_dict(read_state_dict(path), source=path)


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
  """A FID Inception state dict of random numbers, for parity tests without the real weights.

  He-scaled kernels and batch-norm statistics near the identity keep activations of order one through all
  the layers, so relative errors stay meaningful at the output.
  """
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key, shape in sorted(expected_state_dict_shapes().items()):
    if key.endswith('conv.weight') or key == 'fc.weight':
      fan_in = int(np.prod(shape[1:]))
      value = rng.normal(0, np.sqrt(2 / fan_in), shape)
    elif key.endswith(('bn.weight', 'running_var')):
      value = rng.uniform(0.8, 1.2, shape)
    else:  # bn.bias, running_mean, fc.bias
      value = rng.normal(0, 0.1, shape)
    state_dict[key] = value.astype(np.float32)
  return state_dict
