"""Networks: the config-driven UNet and noisy classifier, factories from the `model` and `classifier` config
sections, and a fast jitted init."""

import functools

import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError
from jaxdiff.models.layers import DOWNSAMPLE_PADDINGS
from jaxdiff.models.classifier import POOLS, EncoderUNet
from jaxdiff.models.unet import UNet

__all__ = ['EncoderUNet', 'UNet', 'create_classifier', 'create_model', 'init_params', 'param_shapes']

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Optional keys; the defaults reproduce the DDPM paper network (ADM: True, 0, 1e-5, 'symmetric'; no transformers).
OPTIONAL_KEYS = dict(flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, downsample_padding='asymmetric',
                     conv_resample=True, mid_block_scale_factor=1.0, patch_size=1, transformer_depth=0,
                     context_dim=0, use_linear_projection=False, adm_in_channels=0)
# Context tokens of the dummy batch that initialises a cross-attending UNet (CLIP's 77; no parameter depends on it).
DUMMY_CONTEXT_LENGTH = 77


def _key(cfg, key, default=None, *, section='model'):
  if key in cfg:
    return cfg[key]
  if default is None:
    raise ConfigError(f'{section}.{key} is missing: add it to the {section} section of the config')
  return default


def _dtype(cfg, key):
  name = _key(cfg, key)
  if name not in DTYPES:
    raise ConfigError(f'model.{key}={name!r} is not a known dtype: use one of {sorted(DTYPES)}')
  return DTYPES[name]


def _trunk_fields(cfg, section: str, *, image_size: int) -> dict:
  """The UNetTrunk fields of a `model` or `classifier` config section at `image_size` (the network's input grid),
  checked; error messages name `section`."""
  base = _key(cfg, 'base_channels', section=section)
  mult = tuple(_key(cfg, 'channel_mult', section=section))
  num_res = _key(cfg, 'num_res_blocks', section=section)
  num_res = tuple(num_res) if isinstance(num_res, (tuple, list)) else num_res
  num_heads = _key(cfg, 'num_heads', section=section)
  num_heads = tuple(num_heads) if isinstance(num_heads, (tuple, list)) else num_heads
  head_channels = _key(cfg, 'num_head_channels', section=section)
  dropout = _key(cfg, 'dropout', section=section)
  norm_groups = _key(cfg, 'norm_groups', 32, section=section)
  size = image_size
  downsamples = 2 ** (len(mult) - 1)
  if size % downsamples:
    raise ConfigError(f'{section}.channel_mult has {len(mult)} levels, so the input size {size} must be divisible '
                      f'by {downsamples}: use fewer levels or another image size')
  reachable = [size // 2 ** level for level in range(len(mult))]
  attention_levels = []
  for res in _key(cfg, 'attention_resolutions', section=section):
    if res not in reachable:
      raise ConfigError(f'{section}.attention_resolutions: {res} is not a feature-map size of this network at input '
                        f'size {size}: use some of {reachable}')
    attention_levels.append(reachable.index(res))
  if isinstance(num_res, tuple) and len(num_res) != len(mult):
    raise ConfigError(f'{section}.num_res_blocks={num_res} needs one count per channel_mult level ({len(mult)}): '
                      f'give {len(mult)} counts or a single int')
  if not 0 <= dropout < 1:
    raise ConfigError(f'{section}.dropout={dropout}: use a rate in [0, 1)')
  widths = [int(base * m) for m in mult]
  for width in widths:
    if width % norm_groups:
      raise ConfigError(f'{section}.base_channels={base} with channel_mult={mult} gives {width} channels, not '
                        f'divisible by {section}.norm_groups={norm_groups}: use multiples of it')
  heads = num_heads if isinstance(num_heads, tuple) else (num_heads,) * len(mult)
  if len(heads) != len(mult):
    raise ConfigError(f'{section}.num_heads={num_heads} needs one count per channel_mult level ({len(mult)}): '
                      f'give {len(mult)} counts or a single int')
  # The middle block always attends, at the last level's width and heads.
  for level in sorted(set(attention_levels) | {len(mult) - 1}):
    width = widths[level]
    if head_channels == -1 and width % heads[level]:
      raise ConfigError(f'{section}.num_heads={num_heads} does not divide the {width} attention channels: '
                        f'use a divisor of it or set num_head_channels')
    if head_channels != -1 and width % head_channels:
      raise ConfigError(f'{section}.num_head_channels={head_channels} does not divide the {width} attention '
                        f'channels: use a divisor of it, or -1 to use num_heads')
  return dict(base_channels=base, channel_mult=mult, num_res_blocks=num_res,
              attention_ds=tuple(2 ** level for level in attention_levels), num_heads=num_heads,
              num_head_channels=head_channels, legacy_qkv_order=bool(_key(cfg, 'legacy_qkv_order', section=section)),
              use_scale_shift_norm=bool(_key(cfg, 'use_scale_shift_norm', section=section)),
              resblock_updown=bool(_key(cfg, 'resblock_updown', section=section)), dropout=dropout,
              norm_groups=norm_groups)


def _transformer_fields(opt: dict, fields: dict) -> dict:
  """transformer_depth, context_dim and use_linear_projection of the `model` section, checked."""
  levels = len(fields['channel_mult'])
  depth, context_dim = opt['transformer_depth'], opt['context_dim']
  depth = tuple(depth) if isinstance(depth, (tuple, list)) else depth
  depths = depth if isinstance(depth, tuple) else (depth,) * levels
  if len(depths) != levels:
    raise ConfigError(f'model.transformer_depth={depth} needs one depth per channel_mult level ({levels}): give '
                      f'{levels} depths or a single int')
  if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depths):
    raise ConfigError(f'model.transformer_depth={depth}: use integers >= 0 (0 = ADM attention blocks)')
  if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 0:
    raise ConfigError(f'model.context_dim={context_dim!r}: use an integer >= 0 (0 = no cross-attention)')
  if not isinstance(opt['use_linear_projection'], bool):
    raise ConfigError(f'model.use_linear_projection={opt["use_linear_projection"]!r}: use True or False')
  # The levels whose blocks attend, and the last one, whose depth the middle block takes.
  attending = sorted({level for level in range(levels) if 2 ** level in fields['attention_ds']} | {levels - 1})
  used = [depths[level] for level in attending]
  if min(used) == 0 < max(used):
    raise ConfigError(f'model.transformer_depth={depth} mixes ADM attention blocks (0) and spatial transformers at '
                      f'the attending levels {attending} (the middle block takes the last level\'s depth): give all '
                      'of them a depth >= 1, or 0')
  if context_dim and not max(used):
    raise ConfigError(f'model.context_dim={context_dim}: only spatial transformers cross-attend; set '
                      'model.transformer_depth >= 1, or context_dim=0')
  return dict(transformer_depth=depth, context_dim=context_dim)


def create_model(model_cfg, *, image_size, in_channels, out_channels, num_classes, null_class=False):
  """Builds the UNet that `model_cfg` (the `config.model` ConfigDict) describes, checking its values.

  in_channels is not a field (linen infers it at init) but is checked, so a bad data shape fails here. With
  null_class, the label table has a row num_classes for the dropped condition of classifier-free guidance.
  """
  if in_channels < 1:
    raise ConfigError(f'in_channels={in_channels}: the data must have at least one channel')
  opt = {k: _key(model_cfg, k, v) for k, v in OPTIONAL_KEYS.items()}
  patch = opt['patch_size']
  if image_size % patch:
    raise ConfigError(f'model.patch_size={patch} must divide image_size {image_size}')
  fields = _trunk_fields(model_cfg, 'model', image_size=image_size // patch)
  opt.update(_transformer_fields(opt, fields))
  adm = opt['adm_in_channels']
  if isinstance(adm, bool) or not isinstance(adm, int) or adm < 0:
    raise ConfigError(f'model.adm_in_channels={adm!r}: use an integer >= 0 (0 = no vector condition)')
  if opt['downsample_padding'] not in DOWNSAMPLE_PADDINGS:
    raise ConfigError(f'model.downsample_padding={opt["downsample_padding"]!r}: use one of '
                      f'{sorted(DOWNSAMPLE_PADDINGS)}')
  table = None if num_classes is None else num_classes + int(null_class)
  return UNet(out_channels=out_channels, num_classes=table, remat=bool(_key(model_cfg, 'remat')),
              dtype=_dtype(model_cfg, 'dtype'), param_dtype=_dtype(model_cfg, 'param_dtype'), **fields, **opt)


def create_classifier(classifier_cfg, model_cfg, *, image_size, num_classes):
  """The noisy classifier (EncoderUNet) of `config.classifier`, in guided-diffusion's layout (embedding [cos, sin]
  with shift 0, GroupNorm eps 1e-5, symmetric downsample padding); dtypes and remat follow `config.model`."""
  pool = _key(classifier_cfg, 'pool', section='classifier')
  if pool not in POOLS:
    raise ConfigError(f'classifier.pool={pool!r}: use one of {", ".join(POOLS)}')
  if pool == 'attention' and classifier_cfg.num_head_channels == -1:
    raise ConfigError("classifier.pool='attention' splits heads by channels: set classifier.num_head_channels "
                      '(guided-diffusion uses 64)')
  if num_classes < 2:
    raise ConfigError(f'a classifier needs at least 2 classes, got {num_classes}: train it on a labelled dataset')
  fields = _trunk_fields(classifier_cfg, 'classifier', image_size=image_size)
  return EncoderUNet(out_channels=num_classes, pool=pool, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
                     downsample_padding='symmetric', remat=bool(_key(model_cfg, 'remat')),
                     dtype=_dtype(model_cfg, 'dtype'), param_dtype=_dtype(model_cfg, 'param_dtype'), **fields)


def dummy_inputs(model, image_size, channels, num_classes=None):
  """Arguments of a batch of one for `model.init`: (x, t) for a classifier, (x, t, cond) for the UNet; cond holds
  `label` with num_classes, a zero `context` [1, 77, context_dim] for a cross-attending UNet and a zero `vector`
  [1, adm_in_channels] for one with a vector condition (else None)."""
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  if isinstance(model, EncoderUNet):
    return x, t
  cond = {}
  if num_classes is not None:
    cond['label'] = jnp.zeros((1,), jnp.int32)
  if model.context_dim:
    cond['context'] = jnp.zeros((1, DUMMY_CONTEXT_LENGTH, model.context_dim), jnp.float32)
  if model.adm_in_channels:
    cond['vector'] = jnp.zeros((1, model.adm_in_channels), jnp.float32)
  return x, t, cond or None


def init_params(model, rng, image_size, channels, num_classes):
  """Returns the params tree, initialised under jit (an unjitted linen init takes 10+ s on CPU)."""
  init = jax.jit(functools.partial(model.init, train=False))
  return init(rng, *dummy_inputs(model, image_size, channels, num_classes))['params']


def param_shapes(model, image_size, channels, num_classes):
  """The params tree as ShapeDtypeStructs, without computing anything (for counts and sharding plans)."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), *dummy_inputs(model, image_size, channels, num_classes))['params']
