"""Tests for the first-stage autoencoders: parity with diffusers' AutoencoderKL/VQModel through the importer (diffusers
folders, CompVis-named .ckpt and .safetensors), tiled decoding, the vector quantiser, published parameter counts and
bad checkpoints."""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import randomize_torch as randomize
from jaxdiff.convert import common
from jaxdiff.convert.autoencoder import load_autoencoder
from jaxdiff.errors import CheckpointError, ConfigError
from jaxdiff.models import autoencoder as ae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDED_DIFFUSION_WEIGHTS = os.path.join(REPO, 'tests', 'fixtures', 'guided_diffusion', 'tiny_adm.safetensors')


# PyTorch on one thread for this module (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures('torch_one_thread')


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@functools.cache
def jitted(model, method: str):
  """model.<method> under jit, shared by equal models (the same layout converted from several files)."""
  return jax.jit(lambda params, *args: model.apply({'params': params}, *args, method=getattr(model, method)))


def nhwc(x):
  return jnp.asarray(x.numpy()).transpose(0, 2, 3, 1)


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


# Tiny diffusers configs: KL and VQ, 1 and 3 image channels, 1 and 2 blocks per level, 2 and 3 levels, 3 and 4 latent
# channels, attention in a level (LDM's attn_resolutions) or none in the middle, a code size other than the latent
# width.
KL_SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                up_block_types=('UpDecoderBlock2D',) * 2)
CONFIGS = {
    'kl_small': ('AutoencoderKL', KL_SMALL),
    'kl_attn_gray': ('AutoencoderKL', dict(
        block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=3, norm_num_groups=8, in_channels=1,
        out_channels=1, down_block_types=('DownEncoderBlock2D', 'DownEncoderBlock2D', 'AttnDownEncoderBlock2D'),
        up_block_types=('AttnUpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D'))),
    'vq_embed_no_mid_attn': ('VQModel', dict(KL_SMALL, latent_channels=4, vq_embed_dim=3, num_vq_embeddings=16,
                                             mid_block_add_attention=False)),
}




def diffusers_folder(folder, name, seed=0):
  """A saved diffusers autoencoder of CONFIGS[name] with random weights (the torch extra)."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  diffusers = pytest.importorskip('diffusers', reason='diffusers is not installed')
  cls, cfg = CONFIGS[name]
  torch.manual_seed(seed)
  model = randomize(getattr(diffusers, cls)(**cfg).eval(), seed)
  model.save_pretrained(str(folder))  # config.json + diffusion_pytorch_model.safetensors
  return torch, model


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """name -> (folder, torch model): each config saved once for the module."""
  cache = {}

  def get(name):
    if name not in cache:
      folder = tmp_path_factory.mktemp(name)
      cache[name] = folder, diffusers_folder(folder, name)[1]
    return cache[name]
  return get


def ldm_name(key: str, levels: int) -> str:
  """A diffusers AutoencoderKL/VQModel key as latent-diffusion's ldm.models.autoencoder names it."""
  for pattern, replacement in [
      (r'encoder\.down_blocks\.(\d+)\.resnets\.', r'encoder.down.\1.block.'),
      (r'encoder\.down_blocks\.(\d+)\.attentions\.', r'encoder.down.\1.attn.'),
      (r'encoder\.down_blocks\.(\d+)\.downsamplers\.0\.', r'encoder.down.\1.downsample.'),
      (r'mid_block\.resnets\.0\.', 'mid.block_1.'), (r'mid_block\.resnets\.1\.', 'mid.block_2.'),
      (r'mid_block\.attentions\.0\.', 'mid.attn_1.'), (r'conv_norm_out\.', 'norm_out.'),
      (r'\.conv_shortcut\.', '.nin_shortcut.'), (r'\.group_norm\.', '.norm.'), (r'\.to_q\.', '.q.'),
      (r'\.to_k\.', '.k.'), (r'\.to_v\.', '.v.'), (r'\.to_out\.0\.', '.proj_out.')]:
    key = re.sub(pattern, replacement, key)
  # diffusers counts up blocks from the bottom level, LDM by level.
  up = re.match(r'decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.(.*)', key)
  if up:
    part = {'resnets': 'block', 'attentions': 'attn', 'upsamplers.0': 'upsample'}[up.group(2)]
    key = f'decoder.up.{levels - 1 - int(up.group(1))}.{part}.{up.group(3)}'
  return key


def ldm_state_dict(model):
  """The model's weights in latent-diffusion's names and shapes (attention projections as 1x1 convolutions)."""
  levels = len(model.config.block_out_channels)
  state = {}
  for key, value in model.state_dict().items():
    name = ldm_name(key, levels)
    if re.search(r'(attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight$', name):
      value = value[:, :, None, None]
    state[name] = value.contiguous()
  return state


class Lightning:
  """Stands for what a Lightning .ckpt pickles beside the weights (a callback's state)."""

  def __init__(self, monitor):
    self.monitor = monitor


def check_parity(torch, model, section, params, *, seed=1):
  """fp32 relative errors of encode, decode and the full forward against the PyTorch model."""
  channels = model.config.in_channels
  jax_model = ae.create_autoencoder(section, channels=channels)
  gen = torch.Generator().manual_seed(seed)
  x = torch.randn(2, channels, 16, 16, generator=gen)
  errors = {}
  with torch.no_grad():
    if section.kind == 'kl':
      # The forward pass decodes the posterior's mean: one program checks the encoder (the posterior) and both.
      recon, posterior = jitted(jax_model, '__call__')(params, nhwc(x))
      ref = model.encode(x).latent_dist
      errors['encode mean'] = rel_err(nchw(posterior.mean), ref.mean.numpy())
      errors['encode logvar'] = rel_err(nchw(posterior.logvar), ref.logvar.numpy())
      errors['forward'] = rel_err(nchw(recon), model(x).sample.numpy())
      z = torch.randn(ref.mean.shape, generator=gen)
      errors['decode'] = rel_err(nchw(jitted(jax_model, 'decode')(params, nhwc(z))), model.decode(z).sample.numpy())
    else:
      h = model.encode(x).latents
      errors['encode'] = rel_err(nchw(jitted(jax_model, 'encode')(params, nhwc(x))), h.numpy())
      errors['decode'] = rel_err(nchw(jitted(jax_model, 'decode')(params, nhwc(h))), model.decode(h).sample.numpy())
      ref = model(x)
      recon, aux = jitted(jax_model, '__call__')(params, nhwc(x))
      errors['forward'] = rel_err(nchw(recon), ref.sample.numpy())
      errors['codebook loss'] = rel_err(aux['loss'], ref.commit_loss.numpy())
      indices = model.quantize(h)[2][2].reshape(aux['indices'].shape).numpy()
      assert np.array_equal(np.asarray(aux['indices']), indices)
  return errors


@pytest.mark.torch
@pytest.mark.parametrize('name', list(CONFIGS))
def test_diffusers_parity(tmp_path, saved, name):
  """diffusers folder -> load_autoencoder -> the same encode, decode and forward; then the same weights renamed as
  latent-diffusion saves them, as an SD-style .ckpt (state_dict, first_stage_model.*) and a bare .safetensors."""
  folder, model = saved(name)
  import torch  # pylint: disable=import-outside-toplevel
  section, params = load_autoencoder(str(folder))
  # diffusers' default scaling_factor: SD's for AutoencoderKL, unknown for a VQModel (LDM's VQ models use 1).
  assert (section.kind, section.scale_factor) == (('kl', 0.18215) if name.startswith('kl') else ('vq', 0.0))
  errors = check_parity(torch, model, section, params)
  print(f'{name}: fp32 relative errors ' + ', '.join(f'{k} {v:.2e}' for k, v in errors.items()))
  assert max(errors.values()) < 1e-5

  ldm = ldm_state_dict(model)
  ckpt = tmp_path / 'model.ckpt'
  other = {'model.diffusion_model.out.2.weight': torch.ones(3), 'cond_stage_model.x': torch.ones(1)}
  torch.save({'state_dict': {**{f'first_stage_model.{k}': v for k, v in ldm.items()}, **other}, 'global_step': 3,
              'callbacks': {'checkpoint': Lightning('val/rec_loss')}}, ckpt)
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  bare = tmp_path / 'first_stage.safetensors'
  save_file({**ldm, 'loss.logvar': torch.zeros(())}, str(bare))  # LDM first stages keep their loss's weights
  for path in (ckpt, bare):
    ldm_section, ldm_params = load_autoencoder(str(path), dict(norm_groups=section.norm_groups, scale_factor=0.5))
    assert ldm_section.scale_factor == 0.5
    keys = ('kind', 'base_channels', 'channel_mult', 'num_res_blocks', 'latent_channels', 'mid_attention',
            'attention_levels', 'norm_groups') + (('num_embeddings', 'embedding_dim') if section.kind == 'vq' else ())
    assert {k: ldm_section[k] for k in keys} == {k: section[k] for k in keys}
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ldm_params), jax.tree.leaves(params)))


@pytest.mark.torch
def test_tiled_decode(saved):
  """Against diffusers' enable_tiling() decode with tiles of 4 latent (8 image) pixels on an 8x8 latent (tiles start
  every 3 pixels; the last ones have 2), and equal to the plain decode when one tile covers the latents."""
  folder, model = saved('kl_small')
  import torch  # pylint: disable=import-outside-toplevel
  section, params = load_autoencoder(str(folder))
  jax_model = ae.create_autoencoder(section, channels=3)
  z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
  model.enable_tiling()
  model.tile_latent_min_size, model.tile_sample_min_size = 4, 8
  try:
    with torch.no_grad():
      ref = model.decode(z).sample.numpy()
  finally:
    model.disable_tiling()
  tiled = ae.tiled_decode(jax_model, params, nhwc(z), tile=4)
  err = rel_err(nchw(tiled), ref)
  plain = np.asarray(jitted(jax_model, 'decode')(params, nhwc(z)))
  print(f'tiled decode: fp32 relative error {err:.2e} (plain decode differs by {rel_err(plain, tiled):.2e})')
  assert err < 1e-5 and rel_err(plain, tiled) > 1e-3
  assert np.array_equal(ae.tiled_decode(jax_model, params, nhwc(z), tile=8), plain)


def test_vector_quantizer():
  quantizer = ae.VectorQuantizer(num_embeddings=16, embedding_dim=3, beta=0.25)
  z = jax.random.normal(jax.random.key(0), (2, 4, 5, 3))
  init = jax.jit(quantizer.init)(jax.random.key(1), z)['params']['embedding']
  assert init.shape == (16, 3) and float(jnp.max(jnp.abs(init))) <= 1 / 16  # taming's uniform(-1/K, 1/K)
  codebook = jax.random.normal(jax.random.key(2), (16, 3))
  weights = jax.random.normal(jax.random.key(3), z.shape)

  @jax.jit
  def run(z, codebook):
    def loss(z, codebook, term):
      z_q, aux = quantizer.apply({'params': {'embedding': codebook}}, z)
      return (jnp.sum(z_q * weights) if term == 'z_q' else aux['loss']), (z_q, aux)
    (_, (z_q, aux)), straight_through = jax.value_and_grad(loss, has_aux=True)(z, codebook, 'z_q')
    grads = jax.grad(loss, argnums=(0, 1), has_aux=True)(z, codebook, 'loss')[0]
    return z_q, aux, straight_through, grads

  z_q, aux, straight_through, (grad_z, grad_codebook) = run(z, codebook)
  # Nearest codes by brute force in float64.
  nearest = np.argmin(np.sum((np.asarray(z, np.float64)[..., None, :] - np.asarray(codebook, np.float64)) ** 2,
                             axis=-1), axis=-1)
  assert np.array_equal(np.asarray(aux['indices']), nearest)
  np.testing.assert_allclose(z_q, np.asarray(codebook)[nearest], atol=1e-6)  # z + (z_q - z)
  # Straight-through: the gradient of z_q with respect to z is the identity.
  np.testing.assert_allclose(straight_through, weights, rtol=1e-6)
  # LDM's legacy loss: value (1 + beta) * mean((z - z_q)^2); commitment weight 1 on z, beta on the codebook.
  gap = np.asarray(z) - np.asarray(z_q)
  np.testing.assert_allclose(aux['loss'], 1.25 * np.mean(gap ** 2), rtol=1e-5)
  np.testing.assert_allclose(grad_z, 2 * gap / gap.size, rtol=1e-5, atol=1e-8)
  expected = np.zeros((16, 3))
  np.add.at(expected, nearest.ravel(), -0.25 * 2 * gap.reshape(-1, 3) / gap.size)
  np.testing.assert_allclose(grad_codebook, expected, rtol=1e-5, atol=1e-8)
  # Perplexity and usage of a known assignment: codes 0,0,0,0,1,1,2,3 of 8.
  codebook = np.eye(8, 3, dtype=np.float32) * 10 + np.arange(8, dtype=np.float32)[:, None] * np.float32([0, 0, 1])
  z = codebook[[0, 0, 0, 0, 1, 1, 2, 3]].reshape(1, 2, 4, 3)
  _, aux = jax.jit(ae.VectorQuantizer(8, 3).apply)({'params': {'embedding': codebook}}, z)
  probs = np.array([0.5, 0.25, 0.125, 0.125])
  np.testing.assert_allclose(aux['perplexity'], np.exp(-np.sum(probs * np.log(probs))), rtol=1e-6)
  assert float(aux['usage']) == 0.5 and float(aux['loss']) == 0.0
  np.testing.assert_array_equal(aux['indices'], [[[0, 0, 0, 0], [1, 1, 2, 3]]])


def test_diagonal_gaussian():
  moments = np.random.default_rng(0).normal(size=(2, 3, 3, 4)).astype(np.float32) * np.float32([1, 1, 20, 1])
  moments[0, 0, 0, 2] = -50.0
  key = jax.random.key(1)
  # A pytree: it crosses the jit boundary both ways.
  posterior, kl, sample, noise = jax.jit(lambda m: (ae.DiagonalGaussian(m),) + (lambda p: (
      p.kl(), p.sample(key), jax.random.normal(key, p.mean.shape)))(ae.DiagonalGaussian(m)))(moments)
  mean, logvar = moments[..., :2].astype(np.float64), np.clip(moments[..., 2:].astype(np.float64), -30, 20)
  np.testing.assert_array_equal(posterior.mode(), moments[..., :2])
  assert float(posterior.logvar[0, 0, 0, 0]) == -30.0
  np.testing.assert_allclose(kl, 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(sample, mean + np.exp(0.5 * logvar) * noise, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(posterior.var, np.exp(logvar), rtol=1e-6)
  np.testing.assert_allclose(posterior.std, np.exp(0.5 * logvar), rtol=1e-6)


def test_create_autoencoder():
  section = dict(ae.SECTION_DEFAULTS, base_channels=32, channel_mult=(1, 2), norm_groups=8)
  model = ae.create_autoencoder(section, channels=1)
  assert isinstance(model, ae.AutoencoderKL) and model.latent_channels == 4
  vq = ae.create_autoencoder(dict(section, kind='vq', num_embeddings=64), channels=3)
  assert isinstance(vq, ae.VQModel) and vq.code_dim == 4
  shapes = ae.param_shapes(vq)
  assert shapes['quantize']['embedding'].shape == (64, 4) and shapes['decoder']['conv_out']['kernel'].shape[-1] == 3
  for change, message in [(dict(kind='gan'), 'autoencoder.kind'), (dict(norm_groups=12), 'norm_groups=12'),
                          (dict(attention_levels=(2,)), 'attention_levels'), (dict(channel_mult=()), 'empty')]:
    with pytest.raises(ConfigError, match=message):
      ae.create_autoencoder(dict(section, **change), channels=3)


def diffusers_config(kind, section):
  """diffusers AutoencoderKL/VQModel keyword arguments of a jaxdiff section."""
  levels, attention = len(section['channel_mult']), set(section['attention_levels'])
  cfg = dict(block_out_channels=[section['base_channels'] * m for m in section['channel_mult']],
             layers_per_block=section['num_res_blocks'], latent_channels=section['latent_channels'],
             norm_num_groups=section['norm_groups'], mid_block_add_attention=section['mid_attention'],
             down_block_types=[('Attn' if level in attention else '') + 'DownEncoderBlock2D'
                               for level in range(levels)],
             up_block_types=[('Attn' if level in attention else '') + 'UpDecoderBlock2D'
                             for level in reversed(range(levels))])
  if kind == 'vq':
    cfg.update(num_vq_embeddings=section['num_embeddings'], vq_embed_dim=section['embedding_dim'] or None)
  return cfg


PUBLISHED_NAMES = {'sd', 'sdxl', 'kl-f4', 'kl-f8', 'kl-f16', 'kl-f32', 'vq-f4', 'vq-f8', 'vq-f16'}


@pytest.mark.torch
def test_published_layouts():
  """Every published layout's parameter count, from diffusers' model of the same config (built on the meta device:
  shapes only) and from jaxdiff's (eval_shape), equals the table's."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  diffusers = pytest.importorskip('diffusers', reason='diffusers is not installed')
  assert PUBLISHED_NAMES <= set(ae.PUBLISHED_LAYOUTS)
  assert ae.PUBLISHED_LAYOUTS['sd'][2] == 83_653_863
  ours = {}
  for name, (kind, section, count) in ae.PUBLISHED_LAYOUTS.items():
    assert section['kind'] == kind, name
    with torch.device('meta'):
      model = (diffusers.AutoencoderKL if kind == 'kl' else diffusers.VQModel)(**diffusers_config(kind, section))
    layout = ae.create_autoencoder(section, channels=3)
    if layout not in ours:  # sd, sdxl and kl-f8 share one network
      ours[layout] = sum(x.size for x in jax.tree.leaves(ae.param_shapes(layout)))
    assert (sum(p.numel() for p in model.parameters()), ours[layout]) == (count, count), name


def edited_folder(source, target, config=None, state=None):
  """A copy of a diffusers folder with config.json keys and tensors replaced (None: deleted)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  target.mkdir()
  cfg = json.loads((source / 'config.json').read_text())
  (target / 'config.json').write_text(json.dumps({**cfg, **(config or {})}))
  weights = common.read_safetensors(str(source / 'diffusion_pytorch_model.safetensors'))
  weights = {k: v for k, v in {**weights, **(state or {})}.items() if v is not None}
  save_file(weights, str(target / 'diffusion_pytorch_model.safetensors'))
  return str(target)


@pytest.mark.torch
def test_deprecated_attention_names(tmp_path, saved):
  """diffusers files saved before its attention refactor (query/key/value/proj_attn), some with the 1x1-conv shapes
  of the SD checkpoints they were converted from, load to the same params."""
  folder = saved('kl_small')[0]
  old_names = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  state = {}
  for key, value in common.read_safetensors(str(folder / 'diffusion_pytorch_model.safetensors')).items():
    name = re.sub(r'\.(to_q|to_k|to_v|to_out\.0)\.', lambda m: f'.{old_names[m.group(1)]}.', key)
    state[key] = None
    state[name] = value[:, :, None, None] if name.endswith(('query.weight', 'proj_attn.weight')) else value
  assert any(k.endswith('.proj_attn.weight') for k in state)
  renamed = edited_folder(folder, tmp_path / 'renamed', state=state)
  params, expected = load_autoencoder(renamed)[1], load_autoencoder(str(folder))[1]
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)))


@pytest.mark.torch
@pytest.mark.parametrize('case, message', [
    ('no_config', 'is not a diffusers model folder: it has no config.json'),
    ('unet_folder', 'holds a diffusers UNet2DModel, not an AutoencoderKL or VQModel'),
    ('act_fn', "AutoencoderKL act_fn='gelu' .* is not expressed"),
    ('shift_factor', 'AutoencoderKL shift_factor=0.1'),
    ('block_types', r'blocks \[.*CrossAttnDownBlock2D'),
    ('missing', r'does not match the model: 1 missing \(decoder\.up_blocks\.0\.resnets\.1\.norm2\.bias\)'),
    ('misshaped', r'1 mis-shaped \(encoder\.conv_in\.weight \(32, 3, 5, 5\)'),
    ('unet_state_dict', 'is not an autoencoder checkpoint: it has no encoder.conv_in.weight'),
    ('cfg_mismatch', r'autoencoder\.base_channels: 32 in .*, 64 in the config'),
])
def test_bad_checkpoints(tmp_path, saved, case, message):
  kl_folder, cfg = saved('kl_small')[0], None
  if case == 'no_config':
    path = str(tmp_path)
  elif case == 'unet_folder':
    path = edited_folder(kl_folder, tmp_path / 'unet', config={'_class_name': 'UNet2DModel'})
  elif case in ('act_fn', 'shift_factor', 'block_types'):
    value = dict(act_fn='gelu', shift_factor=0.1, block_types=['CrossAttnDownBlock2D', 'DownEncoderBlock2D'])[case]
    path = edited_folder(kl_folder, tmp_path / case, config={'down_block_types' if case == 'block_types' else case:
                                                             value})
  elif case == 'missing':
    path = edited_folder(kl_folder, tmp_path / case, state={'decoder.up_blocks.0.resnets.1.norm2.bias': None})
  elif case == 'misshaped':
    path = edited_folder(kl_folder, tmp_path / case, state={'encoder.conv_in.weight': np.zeros((32, 3, 5, 5),
                                                                                               np.float32)})
  elif case == 'unet_state_dict':
    path = GUIDED_DIFFUSION_WEIGHTS
  else:
    path, cfg = str(kl_folder), dict(base_channels=64)
  with pytest.raises(CheckpointError, match=message) as err:
    load_autoencoder(path, cfg)
  assert '\n' not in str(err.value)


@pytest.mark.torch
def test_vq_options_refused(tmp_path):
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  diffusers = pytest.importorskip('diffusers', reason='diffusers is not installed')
  with torch.device('meta'):
    model = diffusers.VQModel(**dict(CONFIGS['vq_embed_no_mid_attn'][1], norm_type='spatial'))
  model.save_config(str(tmp_path))  # the config is read (and refused) before any weights
  with pytest.raises(CheckpointError, match="VQModel norm_type='spatial' .* is not expressed"):
    load_autoencoder(str(tmp_path))


@pytest.mark.torch
@pytest.mark.skipif(not os.environ.get('LATENT_DIFFUSION_PATH'), reason='LATENT_DIFFUSION_PATH is not set')
@pytest.mark.parametrize('options', [
    dict(ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(4,)),  # attention in the last level, as kl-f16
    dict(ch_mult=(1, 2), num_res_blocks=1, attn_type='none', in_channels=1, out_ch=1, z_channels=3),  # as vq-f4-noattn
])
def test_latent_diffusion_source_parity(tmp_path, options):
  """A CompVis state dict of latent-diffusion's own Encoder/Decoder (LATENT_DIFFUSION_PATH: a checkout of
  CompVis/latent-diffusion) with KL quant convs, as ldm.models.autoencoder.AutoencoderKL holds them."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  pytest.importorskip('einops', reason='latent-diffusion needs einops')
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.environ['LATENT_DIFFUSION_PATH'])
  try:
    from ldm.modules.diffusionmodules import model as ldm  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  ddconfig = {**dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, num_res_blocks=2,
                     attn_resolutions=(), dropout=0.0), **options}
  z_channels = ddconfig['z_channels']
  torch.manual_seed(0)
  net = randomize(torch.nn.ModuleDict(dict(
      encoder=ldm.Encoder(**ddconfig), decoder=ldm.Decoder(**ddconfig),
      quant_conv=torch.nn.Conv2d(2 * z_channels, 2 * z_channels, 1),
      post_quant_conv=torch.nn.Conv2d(z_channels, z_channels, 1))).eval(), seed=4)
  torch.save(net.state_dict(), tmp_path / 'model.ckpt')
  section, params = load_autoencoder(str(tmp_path / 'model.ckpt'))
  model = ae.create_autoencoder(section, channels=ddconfig['in_channels'])
  gen = torch.Generator().manual_seed(5)
  x = torch.randn(2, ddconfig['in_channels'], 16, 16, generator=gen)
  size = 16 >> (len(ddconfig['ch_mult']) - 1)
  z = torch.randn(2, z_channels, size, size, generator=gen)
  with torch.no_grad():
    mean, logvar = net['quant_conv'](net['encoder'](x)).chunk(2, dim=1)
    image = net['decoder'](net['post_quant_conv'](z))
  posterior = jitted(model, 'encode')(params, nhwc(x))
  errors = dict(mean=rel_err(nchw(posterior.mean), mean.numpy()),
                logvar=rel_err(nchw(posterior.logvar), logvar.clamp(-30, 20).numpy()),
                decode=rel_err(nchw(jitted(model, 'decode')(params, nhwc(z))), image.numpy()))
  print(f'latent-diffusion {options}: fp32 relative errors ' + ', '.join(f'{k} {v:.2e}' for k, v in errors.items()))
  assert section.attention_levels == ((2,) if 'attn_resolutions' in options else ())
  assert section.mid_attention == ('attn_type' not in options)
  assert max(errors.values()) < 1e-5
