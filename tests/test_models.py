"""Tests for jaxdiff.models: shapes, init behaviour, layouts, parameter counts and config errors."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff.errors import ConfigError
from jaxdiff.models import UNet, create_model, init_params, layers, param_shapes

TINY = dict(out_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), num_heads=2,
            norm_groups=4)


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def inputs(batch=2, size=8, channels=3, num_classes=None):
  x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
  cond = None if num_classes is None else {'label': jnp.arange(batch) % num_classes}
  return x, jnp.linspace(0, 999, batch), cond


def ddpm_config(**overrides):
  return ml_collections.ConfigDict({**dict(
      base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,), num_heads=1,
      num_head_channels=-1, legacy_qkv_order=True, use_scale_shift_norm=False, resblock_updown=False, dropout=0.1,
      dtype='float32', param_dtype='float32', remat=False), **overrides})


def random_params(model, num_classes=None):
  """Random params of the right shapes from NumPy, so no random initialiser has to be compiled."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                      param_shapes(model, 8, 3, num_classes))


@pytest.mark.parametrize('options', [
    dict(),
    dict(use_scale_shift_norm=True, resblock_updown=True, legacy_qkv_order=False, num_head_channels=4),
    dict(num_res_blocks=(1, 2), conv_resample=False, downsample_padding='symmetric', attention_ds=(1, 2)),
    dict(num_classes=5, flip_sin_to_cos=True, freq_shift=0),
    dict(dtype=jnp.bfloat16, use_scale_shift_norm=True),
    dict(remat=True, dropout=0.1),
    dict(patch_size=2, attention_ds=(1,)),
], ids=['default', 'adm_style', 'per_level_blocks', 'class_cond', 'bf16', 'remat', 'patches'])
def test_output_shape_and_dtype(options):
  model = UNet(**{**TINY, **options})
  x, t, y = inputs(num_classes=options.get('num_classes'))
  params = random_params(model, options.get('num_classes'))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  out = jax.jit(functools.partial(model.apply, train=False))({'params': params}, x, t, y)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and np.any(out != 0)


def test_remat_keeps_param_names():
  shapes = lambda remat: jax.tree.map(jnp.shape, param_shapes(UNet(**TINY, remat=remat), 8, 3, None))
  assert shapes(True) == shapes(False)


def test_zero_at_init_then_perturbed_and_dropout():
  model = UNet(**{**TINY, 'dropout': 0.5})
  x, t, _ = inputs()

  @functools.partial(jax.jit, static_argnames='train')
  def apply(params, key, train):
    return model.apply({'params': params}, x, t, train=train, rngs={'dropout': key})

  params = init_params(model, jax.random.key(0), 8, 3, None)
  # conv_out is zero-initialised, so the untrained network predicts exactly 0.
  np.testing.assert_array_equal(apply(params, jax.random.key(4), False), 0)
  params = jax.tree.map(lambda p, noise: p + noise, params, random_params(model))
  evaluated = apply(params, jax.random.key(4), False)
  assert np.any(evaluated != 0)
  np.testing.assert_array_equal(evaluated, apply(params, jax.random.key(5), False))
  trained = apply(params, jax.random.key(4), True)
  assert np.any(trained != evaluated)
  assert np.any(trained != apply(params, jax.random.key(5), True))


@pytest.mark.parametrize('flip, shift', [(False, 1), (True, 0)])
def test_timestep_embedding(flip, shift):
  t = np.array([0.0, 3.0, 999.0])
  emb = layers.timestep_embedding(jnp.asarray(t), 7, flip_sin_to_cos=flip, freq_shift=shift)
  args = t[:, None] * np.exp(-math.log(10000) * np.arange(3) / (3 - shift))
  parts = [np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)]
  expected = np.concatenate(parts + [np.zeros((3, 1))], axis=1)  # odd width: zero column last
  np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)


def test_legacy_qkv_order_is_a_head_first_permutation():
  heads, d = 2, 4
  c = heads * d
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, c))
  block = lambda legacy: layers.AttentionBlock(num_heads=heads, legacy_qkv_order=legacy, norm_groups=2)
  params = block(False).init(jax.random.key(1), x)['params']
  params['proj_out']['kernel'] = jax.random.normal(jax.random.key(2), (c, c))
  # New order columns are (qkv, head, d); legacy columns are (head, qkv, d).
  perm = np.arange(3 * c).reshape(3, heads, d).transpose(1, 0, 2).ravel()
  legacy = {**params, 'qkv': {'kernel': params['qkv']['kernel'][:, perm], 'bias': params['qkv']['bias'][perm]}}
  new_out = block(False).apply({'params': params}, x)
  np.testing.assert_allclose(block(True).apply({'params': legacy}, x), new_out, rtol=1e-5, atol=1e-5)
  assert not np.allclose(block(True).apply({'params': params}, x), new_out)


@pytest.mark.parametrize('padding, pads', [('symmetric', (1, 1)), ('asymmetric', (0, 1))])
def test_downsample_padding(padding, pads):
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 2))
  down = layers.Downsample(padding=padding)
  params = down.init(jax.random.key(1), x)
  kernel = params['params']['conv']['kernel']
  padded = jnp.pad(x, ((0, 0), pads, pads, (0, 0)))
  expected = jax.lax.conv_general_dilated(padded, kernel, (2, 2), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(down.apply(params, x), expected + params['params']['conv']['bias'], atol=1e-6)


def test_ddpm_cifar10_param_count():
  model = create_model(ddpm_config(), image_size=32, in_channels=3, out_channels=3, num_classes=None)
  assert model.attention_ds == (2,)
  shapes = param_shapes(model, 32, 3, None)
  # Same count as diffusers' google/ddpm-cifar10-32 UNet2DModel (the paper's 35.7M).
  assert count(shapes) == 35_746_307
  assert round(count(shapes) / 1e6, 1) == 35.7
  assert {'time_embed', 'conv_in', 'down_0_res_1', 'down_1_attn_0', 'down_2_downsample', 'mid_attn', 'up_1_attn_2',
          'up_3_res_2', 'up_1_upsample', 'norm_out', 'conv_out'} <= set(shapes)


def test_adm_imagenet64_param_count():
  cfg = ddpm_config(base_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_resolutions=(32, 16, 8),
                    num_head_channels=64, legacy_qkv_order=False, resblock_updown=True, use_scale_shift_norm=True,
                    dropout=0.0, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, downsample_padding='symmetric')
  model = create_model(cfg, image_size=64, in_channels=3, out_channels=6, num_classes=1000)
  assert model.attention_ds == (2, 4, 8)
  assert count(param_shapes(model, 64, 3, 1000)) == 295_904_454


@pytest.mark.parametrize('overrides, key', [
    (dict(dtype='float16'), 'model.dtype'),
    (dict(param_dtype='fp32'), 'model.param_dtype'),
    (dict(attention_resolutions=(12,)), 'model.attention_resolutions'),
    (dict(base_channels=48), 'model.base_channels'),
    (dict(num_heads=3), 'model.num_heads'),
    (dict(num_head_channels=96), 'model.num_head_channels'),
    (dict(num_res_blocks=(2, 2)), 'model.num_res_blocks'),
    (dict(downsample_padding='same'), 'model.downsample_padding'),
    (dict(dropout=1.5), 'model.dropout'),
    (dict(channel_mult=(1, 2, 2, 2, 2, 2, 2)), 'model.channel_mult'),
])
def test_config_errors(overrides, key):
  cfg = ddpm_config(**overrides)
  with pytest.raises(ConfigError, match=key.replace('.', r'\.')) as err:
    create_model(cfg, image_size=32, in_channels=3, out_channels=3, num_classes=None)
  assert '\n' not in str(err.value)


def test_missing_key_is_a_config_error():
  cfg = ddpm_config()
  del cfg['num_heads']
  with pytest.raises(ConfigError, match=r'model\.num_heads is missing'):
    create_model(cfg, image_size=32, in_channels=3, out_channels=3, num_classes=None)


def test_iddpm_cifar10_param_count():
  # improved-diffusion's CIFAR-10 flags: 128 ch, 3 res blocks, attention 16 and 8, 4 heads, learned sigma, dropout 0.3.
  cfg = ddpm_config(num_res_blocks=3, attention_resolutions=(16, 8), num_heads=4, use_scale_shift_norm=True,
                    dropout=0.3, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, downsample_padding='symmetric')
  model = create_model(cfg, image_size=32, in_channels=3, out_channels=6, num_classes=None)
  assert count(param_shapes(model, 32, 3, None)) == 52_546_438  # = improved-diffusion UNetModel, counted in torch


@pytest.mark.parametrize('name, size, expected', [
    ('adm_imagenet64', 64, 295_904_454), ('adm_imagenet128', 128, 421_529_606),
    ('adm_imagenet256', 256, 553_838_086)])
def test_adm_config_param_counts(name, size, expected):
  # Expected counts are guided-diffusion UNetModel's for the README flags, counted in torch.
  config = __import__(f'configs.{name}', fromlist=['get_config']).get_config()
  assert config.data.image_size == size and config.model.num_classes == 1000
  model = create_model(config.model, image_size=size, in_channels=3, out_channels=6, num_classes=1000)
  assert count(param_shapes(model, size, 3, 1000)) == expected


def test_patches_are_space_to_depth():
  """With patch_size 2, output pixel (i, j) comes from output channel (i % 2, j % 2) of its patch: a network whose
  last conv passes patch channels through returns the input, pixel for pixel."""
  model = UNet(**{**TINY, 'patch_size': 2, 'attention_ds': ()})
  x, t, _ = inputs()
  params = random_params(model)
  assert params['conv_in']['kernel'].shape[2] == 12 and params['conv_out']['kernel'].shape[3] == 12
  captured = {}

  def capture(next_fun, args, kwargs, context):
    if context.module.name == 'conv_in':
      captured['patches'] = args[0]
    if context.module.name == 'conv_out':
      return captured['patches']  # the patches themselves, as if every layer between were the identity
    return next_fun(*args, **kwargs)

  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  with nn.intercept_methods(capture):
    out = model.apply({'params': params}, x, t, train=False)
  np.testing.assert_array_equal(out, x)
