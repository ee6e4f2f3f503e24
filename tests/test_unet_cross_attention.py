"""The UNet with spatial transformers (LDM / Stable Diffusion 1.x-2.x): parity with diffusers' UNet2DConditionModel
on random weights, the same weights as an LDM single file, the SD 1.5 / 2.1 parameter counts, attention that never
holds [B, heads, 4096, 4096], and the one-line errors of bad configs, contexts and checkpoints."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default, sd15, sd21
from helpers import randomize_torch as randomize
from jaxdiff.convert import common, sd_unet
from jaxdiff.errors import CheckpointError, ConfigError
from jaxdiff.models import UNet, attention, create_model, init_params, param_shapes, transformer

TINY = dict(out_channels=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(1, 2), num_heads=4,
            norm_groups=8, transformer_depth=1, context_dim=16, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
            downsample_padding='symmetric')
TWO_LEVELS = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  norm_num_groups=8, cross_attention_dim=24)
# diffusers UNet2DConditionModel configs, each a different way of giving heads, depths and projections.
CONFIGS = {
    'conv_head_count': dict(TWO_LEVELS, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                            up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=4),
    # SD 2.x style: heads per level of 16 channels each, linear projections, two blocks per transformer.
    'linear_head_channels_depth2': dict(
        TWO_LEVELS, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        transformer_layers_per_block=2, upcast_attention=True,
        down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D')),
    'per_level_class': dict(
        TWO_LEVELS, layers_per_block=(1, 2), attention_head_dim=(2, 8), transformer_layers_per_block=(1, 2),
        num_class_embeds=5, cross_attention_dim=16, down_block_types=('CrossAttnDownBlock2D',) * 2,
        up_block_types=('CrossAttnUpBlock2D',) * 2),
    # Layout options an LDM file cannot hold (tested through diffusers only).
    'layout': dict(TWO_LEVELS, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                   up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=2, flip_sin_to_cos=False,
                   freq_shift=1, downsample_padding=0, mid_block_scale_factor=2 ** 0.5, norm_eps=1e-6, out_channels=3),
}
LDM_RESNET = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'time_emb_proj': 'emb_layers.1', 'norm2': 'out_layers.0',
              'conv2': 'out_layers.3', 'conv_shortcut': 'skip_connection'}


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))




def section_of(**keys) -> ml_collections.ConfigDict:
  """The default model section with `keys` (a new ConfigDict: the typed default refuses tuples for int keys)."""
  return ml_collections.ConfigDict({**default.get_config().model.to_dict(), **keys})


def ldm_state(state: dict, cfg: dict) -> dict:
  """diffusers UNet2DConditionModel names -> an SD single file's (model.diffusion_model.*), following the order in
  which LDM's openaimodel builds input_blocks and output_blocks."""
  levels = len(cfg['block_out_channels'])
  per = cfg['layers_per_block']
  per = per if isinstance(per, tuple) else (per,) * levels
  attends = [d.startswith('CrossAttn') for d in cfg['down_block_types']]
  names = {'conv_in': 'input_blocks.0.0', 'time_embedding.linear_1': 'time_embed.0',
           'time_embedding.linear_2': 'time_embed.2', 'class_embedding': 'label_emb', 'conv_norm_out': 'out.0',
           'conv_out': 'out.2', 'mid_block.resnets.0': 'middle_block.0', 'mid_block.attentions.0': 'middle_block.1',
           'mid_block.resnets.1': 'middle_block.2'}
  k = 1
  for level in range(levels):
    for i in range(per[level]):
      names[f'down_blocks.{level}.resnets.{i}'] = f'input_blocks.{k}.0'
      names[f'down_blocks.{level}.attentions.{i}'] = f'input_blocks.{k}.1'
      k += 1
    if level < levels - 1:
      names[f'down_blocks.{level}.downsamplers.0.conv'] = f'input_blocks.{k}.0.op'
      k += 1
  k = 0
  for up in range(levels):  # diffusers' up_blocks start at the deepest level
    level = levels - 1 - up
    for i in range(per[level] + 1):
      names[f'up_blocks.{up}.resnets.{i}'] = f'output_blocks.{k}.0'
      names[f'up_blocks.{up}.attentions.{i}'] = f'output_blocks.{k}.1'
      k += 1
    if level:
      names[f'up_blocks.{up}.upsamplers.0.conv'] = f'output_blocks.{k - 1}.{2 if attends[level] else 1}.conv'
  out = {'first_stage_model.decoder.conv_in.weight': np.zeros(3, np.float32), 'cond_stage_model.x': np.zeros(1)}
  for key, value in state.items():
    module = max((m for m in names if key.startswith(m + '.')), key=len)
    rest = key[len(module) + 1:]
    if 'resnets' in module:
      sub, _, leaf = rest.partition('.')
      rest = f'{LDM_RESNET[sub]}.{leaf}'
    out[f'model.diffusion_model.{names[module]}.{rest}'] = value
  return out


@functools.cache
def reference(name: str, folder: str):
  """(torch model, its state dict as NumPy) of CONFIGS[name], every weight random, saved to `folder`."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  diffusers = pytest.importorskip('diffusers', reason='diffusers is not installed')
  torch.manual_seed(0)
  model = randomize(diffusers.UNet2DConditionModel(**CONFIGS[name]).eval())
  model.save_pretrained(folder)
  return model, {k: v.numpy() for k, v in model.state_dict().items()}


def check_parity(model, cfg, section, shape, params):
  """Relative error of the converted UNet against the PyTorch one, fp32, at batch 2 with a 7-token context."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(1)
  x = torch.randn(2, cfg['in_channels'], 8, 8, generator=gen)
  t = torch.tensor([3, 901])
  context = torch.randn(2, 7, cfg['cross_attention_dim'], generator=gen)
  labels = torch.tensor([1, 4]) if cfg.get('num_class_embeds') else None
  with torch.no_grad():
    ref = model(x, t, context, class_labels=labels).sample.numpy()
  cond = {'context': jnp.asarray(context.numpy())}
  if labels is not None:
    cond['label'] = jnp.asarray(labels.numpy())
  unet = sd_unet.build(section, shape)
  out = jax.jit(functools.partial(unet.apply, train=False))(
      {'params': params}, jnp.asarray(x.numpy()).transpose(0, 2, 3, 1), jnp.asarray(t.numpy(), jnp.float32), cond)
  return rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref)


@pytest.mark.torch
@pytest.mark.parametrize('name', list(CONFIGS))
def test_diffusers_parity_and_ldm_single_file(tmp_path, name):
  cfg = CONFIGS[name]
  model, state = reference(name, str(tmp_path / 'unet'))
  section, shape, params = sd_unet.load_diffusers(str(tmp_path / 'unet'))
  assert shape == dict(image_size=8, in_channels=4, out_channels=cfg['out_channels'])
  err = check_parity(model, cfg, section, shape, params)
  print(f'diffusers UNet2DConditionModel {name}: fp32 relative error {err:.2e}')
  assert err < 1e-5
  if name == 'layout':
    return
  # The same weights under LDM names, in a single file beside other models' tensors, load to the same params.
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(ldm_state(state, cfg), str(tmp_path / 'sd.safetensors'))
  from_file = sd_unet.load_unet(str(tmp_path / 'sd.safetensors'), section, image_size=8)
  assert jax.tree.all(jax.tree.map(np.array_equal, from_file, params))
  # Everything but the heads (which no tensor holds) is read from the shapes.
  inferred, ldm_shape = sd_unet.section_from_ldm_state_dict(common.read_safetensors(str(tmp_path / 'sd.safetensors')),
                                                            image_size=8)
  assert ldm_shape == shape
  for key in ('base_channels', 'channel_mult', 'num_res_blocks', 'attention_resolutions', 'context_dim',
              'use_linear_projection', 'class_conditional', 'num_classes', 'norm_eps', 'downsample_padding'):
    assert inferred[key] == section[key], key
  assert inferred.transformer_depth == section.transformer_depth


@pytest.mark.torch
def test_transformer_without_context_matches_diffusers():
  """context_dim=0: self-attention only (no attn2), as diffusers' Transformer2DModel without cross_attention_dim."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  diffusers = pytest.importorskip('diffusers', reason='diffusers is not installed')
  torch.manual_seed(0)
  ref = randomize(diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32,
                                               norm_num_groups=8, num_layers=2).eval())
  block = transformer.SpatialTransformer(heads=2, depth=2, norm_groups=8)
  shapes = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 4, 4, 32)))['params']
  assert 'attn2' not in shapes['block_0'] and 'norm2' not in shapes['block_0']
  state = {f'x.{k}': v.numpy() for k, v in ref.state_dict().items()}
  params = common.fill_params(state, {'x': shapes}, sd_unet.torch_keys({'x': 'x'}, {}), what='Transformer2DModel')['x']
  x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = ref(x).sample.numpy()
  out = block.apply({'params': params}, jnp.asarray(x.numpy()).transpose(0, 2, 3, 1))
  assert rel_err(np.asarray(out).transpose(0, 3, 1, 2), expected) < 1e-5


@pytest.mark.torch
def test_bad_checkpoints(tmp_path):
  cfg = CONFIGS['conv_head_count']
  _, state = reference('conv_head_count', str(tmp_path / 'unet'))
  section, _ = sd_unet.folder_section(str(tmp_path / 'unet'))
  ldm = ldm_state(state, cfg)
  cases = {'missing': ({k: v for k, v in ldm.items() if 'attn2.to_v' not in k}, r'\d+ missing \(.*attn2\.to_v'),
           'mis-shaped': ({**ldm, 'model.diffusion_model.out.2.bias': np.zeros(5, np.float32)},
                          r'mis-shaped \(model\.diffusion_model\.out\.2\.bias \(5,\)'),
           'unexpected': ({**ldm, 'model.diffusion_model.input_blocks.1.1.extra.weight': np.zeros(1, np.float32)},
                          r'unexpected \(.*extra')}
  for name, (bad, message) in cases.items():
    with pytest.raises(CheckpointError, match=message) as err:
      sd_unet.convert_ldm(bad, section, image_size=8, what=name)
    assert '\n' not in str(err.value)
  other = section_of(**{**section.to_dict(), 'context_dim': 32})
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(ldm, str(tmp_path / 'sd.safetensors'))
  for path in (str(tmp_path / 'unet'), str(tmp_path / 'sd.safetensors')):
    with pytest.raises(CheckpointError, match=r'model\.context_dim: 24 in .*, 32 in the config') as err:
      sd_unet.load_unet(path, other, image_size=8)
    assert '\n' not in str(err.value)
  with pytest.raises(CheckpointError, match='holds no LDM/SD UNet'):
    sd_unet.unet_state({'first_stage_model.x': np.zeros(1)}, 'vae.ckpt')


@pytest.mark.parametrize('option, value', [
    ('only_cross_attention', True), ('dual_cross_attention', True), ('resnet_time_scale_shift', 'scale_shift'),
    ('class_embed_type', 'timestep'), ('addition_embed_type', 'text_time'), ('time_cond_proj_dim', 256),
    ('mid_block_type', 'UNetMidBlock2DSimpleCrossAttn'), ('transformer_layers_per_block', [[1, 1], [1, 1]]),
    ('cross_attention_dim', (24, 32)), ('down_block_types', ('SimpleCrossAttnDownBlock2D', 'DownBlock2D')),
    ('_class_name', 'UNet2DModel'), ('norm_num_groups', None), ('sample_size', None)])
def test_unsupported_diffusers_options_are_named(option, value):
  cfg = dict(CONFIGS['conv_head_count'], **{option: value})
  with pytest.raises(CheckpointError, match=option.replace('_class_name', 'UNet2DModel')) as err:
    sd_unet.model_section(cfg, 'unet/config.json')
  assert '\n' not in str(err.value)


def test_diffusers_head_counts_are_heads():
  """attention_head_dim counts heads: SD 1.5's 8 -> 8 heads; SD 2.1's [5, 10, 20, 20] -> 64 channels per head."""
  sd = dict(sample_size=64, cross_attention_dim=768)
  assert sd_unet.model_section(dict(sd, attention_head_dim=8))[0].num_heads == 8
  section, _ = sd_unet.model_section(dict(sd, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True))
  assert (section.num_heads, section.num_head_channels) == (1, 64)
  assert sd_unet.model_section(dict(sd, attention_head_dim=3, num_attention_heads=5))[0].num_heads == 5


@pytest.mark.parametrize('config, latent, expected', [(sd15, 64, 859_520_964), (sd21, 96, 865_910_724)])
def test_stable_diffusion_unet_param_counts(config, latent, expected):
  """diffusers' UNet2DConditionModel counts of SD 1.5 and 2.1, from shapes alone."""
  c = config.get_config()
  assert c.data.image_size // 8 == latent and c.model.attention_resolutions == (latent, latent // 2, latent // 4)
  model = create_model(c.model, image_size=latent, in_channels=4, out_channels=4, num_classes=None)
  shapes = param_shapes(model, latent, 4, None)
  assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == expected
  block = shapes['down_1_attn_0']['block_0']
  assert block['attn2']['k']['kernel'].shape == (c.model.context_dim, 640)
  assert shapes['mid_attn']['proj_in']['kernel'].shape == ((1280, 1280) if c.model.use_linear_projection
                                                           else (1, 1, 1280, 1280))
  smoke = config.get_config('smoke')
  create_model(smoke.model, image_size=smoke.data.image_size // 8, in_channels=4, out_channels=4, num_classes=None)


def test_sd_attention_never_holds_the_full_weights():
  """At 512px (64x64 latents: 4096 tokens, SD 1.5's 8 heads of 40) the lowered forward and backward passes of
  self- and cross-attention hold no [..., 4096, 4096] array."""
  full = re.compile(r'tensor<[0-9x]*4096x4096x')
  q = jax.ShapeDtypeStruct((2, 4096, 8, 40), jnp.float32)
  for keys in (4096, 77):
    kv = jax.ShapeDtypeStruct((2, keys, 8, 40), jnp.float32)
    loss = lambda q, k, v: jnp.sum(attention.fast_attention(q, k, v))
    for fn in (attention.fast_attention, jax.grad(loss, argnums=(0, 1, 2))):
      text = jax.jit(fn).lower(q, kv, kv).as_text()
      assert 'x4096x' in text and not full.search(text)
  materialised = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v)).lower(q, q, q).as_text()
  assert full.search(materialised)  # the check would see one


@pytest.mark.parametrize('shape, budget', [((2, 64, 2, 8, 64), 256), ((1, 100, 4, 16, 7), 256),
                                           ((3, 50, 1, 8, 50), None)],
                         ids=['blocked_self', 'blocked_cross', 'materialised'])
def test_fast_attention_matches_the_textbook_formula(monkeypatch, shape, budget):
  """Values and gradients; a small logits budget sends it through the blocked kernel in several blocks."""
  if budget:
    monkeypatch.setattr(attention, 'LOGITS_PER_BLOCK', budget)
  b, t, h, d, s = shape
  q, k, v = (jax.random.normal(jax.random.key(i), (b, n, h, d)) for i, n in enumerate((t, s, s)))
  cotangent = jax.random.normal(jax.random.key(3), (b, t, h, d))

  def textbook(q, k, v):
    weights = jax.nn.softmax(jnp.einsum('bthd,bshd->bhts', q, k) / d ** 0.5, axis=-1)
    return jnp.einsum('bhts,bshd->bthd', weights, v)

  assert ('scan' in str(jax.make_jaxpr(attention.fast_attention)(q, k, v))) == bool(budget)  # blocks, or one matmul
  out, vjp = jax.vjp(jax.jit(attention.fast_attention), q, k, v)
  expected, expected_vjp = jax.vjp(textbook, q, k, v)
  np.testing.assert_allclose(out, expected, atol=2e-6)
  for grad, expected_grad in zip(vjp(cotangent), expected_vjp(cotangent)):
    np.testing.assert_allclose(grad, expected_grad, atol=2e-5)


@pytest.mark.parametrize('overrides, message', [
    (dict(transformer_depth=(1, 1, 1)), r'model\.transformer_depth=\(1, 1, 1\) needs one depth per channel_mult'),
    (dict(transformer_depth=-1), r'model\.transformer_depth=-1: use integers >= 0'),
    (dict(context_dim=-2), r'model\.context_dim=-2'),
    (dict(transformer_depth=0), r'model\.context_dim=16: only spatial transformers cross-attend'),
    (dict(transformer_depth=(1, 0)), r'mixes ADM attention blocks'),
    (dict(num_heads=(4, 4, 4)), r'model\.num_heads=\(4, 4, 4\) needs one count per channel_mult level'),
    (dict(num_heads=(4, 3)), r'model\.num_heads=\(4, 3\) does not divide the 64 attention channels'),
    (dict(num_head_channels=24), r'model\.num_head_channels=24 does not divide the 32'),
    (dict(use_linear_projection=1), r'model\.use_linear_projection=1'),
])
def test_config_errors(overrides, message):
  cfg = section_of(**{**dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8, 4),
                             norm_groups=8, num_heads=4, transformer_depth=1, context_dim=16), **overrides})
  with pytest.raises(ConfigError, match=message) as err:
    create_model(cfg, image_size=8, in_channels=4, out_channels=4, num_classes=None)
  assert '\n' not in str(err.value)


def test_context_errors_and_dtypes():
  model = UNet(**TINY)
  params = init_params(model, jax.random.key(0), 8, 4, None)  # a zero context of the right width initialises it
  assert params['down_0_attn_0']['block_0']['attn2']['k']['kernel'].shape == (16, 32)
  x, t = jnp.ones((2, 8, 8, 4)), jnp.array([1.0, 500.0])
  cases = [(None, r'model\.context_dim=16: the UNet cross-attends to cond\[\'context\'\] \[B, L, 16\], and none'),
           ({'context': jnp.ones((2, 5, 12))}, r'has shape \(2, 5, 12\); the UNet takes \[2, L, 16\]'),
           ({'context': jnp.ones((1, 5, 16))}, r'has shape \(1, 5, 16\)')]
  for cond, message in cases:
    with pytest.raises(ConfigError, match=message) as err:
      model.apply({'params': params}, x, t, cond, train=False)
    assert '\n' not in str(err.value)
  plain = UNet(**{**TINY, 'context_dim': 0})
  with pytest.raises(ConfigError, match=r'model\.context_dim=0: this UNet does not cross-attend'):
    plain.apply({'params': {}}, x, t, {'context': jnp.ones((2, 5, 16))}, train=False)  # refused before any layer
  # bf16 compute with remat keeps the parameter tree and gives a float32 output.
  variant = UNet(**{**TINY, 'dtype': jnp.bfloat16, 'remat': True})
  assert jax.tree.map(jnp.shape, param_shapes(variant, 8, 4, None)) == jax.tree.map(jnp.shape, params)
  noisy = jax.tree.map(lambda p: p + 0.1, params)
  apply = jax.jit(functools.partial(variant.apply, train=False))
  out = apply({'params': noisy}, x, t, {'context': jnp.ones((2, 5, 16))})
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out))) and bool(jnp.any(out != 0))
