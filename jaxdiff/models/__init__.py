"""Networks: the config-driven UNet, a factory from the `model` config section, and a fast jitted init."""

import functools

import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError
from jaxdiff.models.layers import DOWNSAMPLE_PADDINGS
from jaxdiff.models.unet import UNet

__all__ = ['UNet', 'create_model', 'init_params', 'param_shapes']

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Optional keys; the defaults reproduce the DDPM paper network (ADM: True, 0, 1e-5, 'symmetric').
OPTIONAL_KEYS = dict(flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, downsample_padding='asymmetric',
                     norm_groups=32, conv_resample=True, mid_block_scale_factor=1.0, patch_size=1)


def _key(cfg, key, default=None):
  if key in cfg:
    return cfg[key]
  if default is None:
    raise ConfigError(f'model.{key} is missing: add it to the model section of the config')
  return default


def _dtype(cfg, key):
  name = _key(cfg, key)
  if name not in DTYPES:
    raise ConfigError(f'model.{key}={name!r} is not a known dtype: use one of {sorted(DTYPES)}')
  return DTYPES[name]


def create_model(model_cfg, *, image_size, in_channels, out_channels, num_classes):
  """Builds the UNet that `model_cfg` (the `config.model` ConfigDict) describes, checking its values.

  in_channels is not a field (linen infers it at init) but is checked, so a bad data shape fails here.
  """
  if in_channels < 1:
    raise ConfigError(f'in_channels={in_channels}: the data must have at least one channel')
  opt = {k: _key(model_cfg, k, v) for k, v in OPTIONAL_KEYS.items()}
  base = _key(model_cfg, 'base_channels')
  mult = tuple(_key(model_cfg, 'channel_mult'))
  num_res = _key(model_cfg, 'num_res_blocks')
  num_res = tuple(num_res) if isinstance(num_res, (tuple, list)) else num_res
  num_heads, head_channels = _key(model_cfg, 'num_heads'), _key(model_cfg, 'num_head_channels')
  dropout = _key(model_cfg, 'dropout')

  patch = opt['patch_size']
  if image_size % patch:
    raise ConfigError(f'model.patch_size={patch} must divide image_size {image_size}')
  size = image_size // patch  # the network's input grid
  downsamples = 2 ** (len(mult) - 1)
  if size % downsamples:
    raise ConfigError(f'model.channel_mult has {len(mult)} levels, so image_size {image_size} / model.patch_size '
                      f'{patch} must be divisible by {downsamples}: use fewer levels or another image size')
  reachable = [size // 2 ** level for level in range(len(mult))]
  attention_levels = []
  for res in _key(model_cfg, 'attention_resolutions'):
    if res not in reachable:
      raise ConfigError(f'model.attention_resolutions: {res} is not a feature-map size of this UNet at image_size '
                        f'{image_size}: use some of {reachable}')
    attention_levels.append(reachable.index(res))
  if isinstance(num_res, tuple) and len(num_res) != len(mult):
    raise ConfigError(f'model.num_res_blocks={num_res} needs one count per channel_mult level ({len(mult)}): '
                      f'give {len(mult)} counts or a single int')
  if opt['downsample_padding'] not in DOWNSAMPLE_PADDINGS:
    raise ConfigError(f'model.downsample_padding={opt["downsample_padding"]!r}: use one of '
                      f'{sorted(DOWNSAMPLE_PADDINGS)}')
  if not 0 <= dropout < 1:
    raise ConfigError(f'model.dropout={dropout}: use a rate in [0, 1)')
  widths = [int(base * m) for m in mult]
  for width in widths:
    if width % opt['norm_groups']:
      raise ConfigError(f'model.base_channels={base} with channel_mult={mult} gives {width} channels, not divisible '
                        f'by model.norm_groups={opt["norm_groups"]}: use multiples of it')
  # The middle block always attends at the last level's width.
  for width in {int(base * mult[level]) for level in attention_levels} | {int(base * mult[-1])}:
    if head_channels == -1 and width % num_heads:
      raise ConfigError(f'model.num_heads={num_heads} does not divide the {width} attention channels: '
                        f'use a divisor of it or set num_head_channels')
    if head_channels != -1 and width % head_channels:
      raise ConfigError(f'model.num_head_channels={head_channels} does not divide the {width} attention channels: '
                        f'use a divisor of it, or -1 to use num_heads')

  return UNet(out_channels=out_channels, base_channels=base, channel_mult=mult, num_res_blocks=num_res,
              attention_ds=tuple(2 ** level for level in attention_levels), num_heads=num_heads,
              num_head_channels=head_channels,
              legacy_qkv_order=bool(_key(model_cfg, 'legacy_qkv_order')),
              use_scale_shift_norm=bool(_key(model_cfg, 'use_scale_shift_norm')),
              resblock_updown=bool(_key(model_cfg, 'resblock_updown')), dropout=dropout, num_classes=num_classes,
              remat=bool(_key(model_cfg, 'remat')), dtype=_dtype(model_cfg, 'dtype'),
              param_dtype=_dtype(model_cfg, 'param_dtype'), **opt)


def _dummy_inputs(image_size, channels, num_classes):
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  y = None if num_classes is None else jnp.zeros((1,), jnp.int32)
  return x, jnp.zeros((1,), jnp.float32), y


def init_params(model, rng, image_size, channels, num_classes):
  """Returns the params tree, initialised under jit (an unjitted linen init takes 10+ s on CPU)."""
  init = jax.jit(functools.partial(model.init, train=False))
  return init(rng, *_dummy_inputs(image_size, channels, num_classes))['params']


def param_shapes(model, image_size, channels, num_classes):
  """The params tree as ShapeDtypeStructs, without computing anything (for counts and sharding plans)."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), *_dummy_inputs(image_size, channels, num_classes))['params']
