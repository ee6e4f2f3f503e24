"""SDXL's UNet: the vector condition against diffusers' UNet2DConditionModel with addition_embed_type='text_time' on
random weights, the same weights as an SGM single file; the SDXL base and refiner configs' exact parameter counts and
layouts (against diffusers' models built on torch's meta device, and as read from SGM key sets); the train state's
bytes per device under mesh.fsdp=8; the one-line errors of bad vectors."""

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sdxl_base, sdxl_refiner
from helpers import REPO
from helpers import randomize_torch as randomize
from jaxdiff.convert import common, sd_unet
from jaxdiff.errors import ConfigError
from jaxdiff.models import UNet, conditioning, create_model, param_shapes
from jaxdiff.train import mesh as mesh_lib
from test_unet_cross_attention import ldm_state, rel_err, section_of

pytestmark = pytest.mark.usefixtures('torch_one_thread')

POOLED, MICRO = 16, 8  # the tiny model's pooled text width and sinusoid width
TINY = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
            up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32, norm_num_groups=8,
            addition_embed_type='text_time', addition_time_embed_dim=MICRO,
            projection_class_embeddings_input_dim=POOLED + 6 * MICRO)
# The released UNet configs (stabilityai/stable-diffusion-xl-{base,refiner}-1.0 unet/config.json), the keys that
# differ from UNet2DConditionModel's defaults.
XL = dict(sample_size=128, use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=256,
          norm_num_groups=32)
RELEASED = {
    'base': (sdxl_base, dict(
        XL, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, projection_class_embeddings_input_dim=2816,
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'))),
    'refiner': (sdxl_refiner, dict(
        XL, block_out_channels=(384, 768, 1536, 1536), transformer_layers_per_block=4,
        attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280, projection_class_embeddings_input_dim=2560,
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'))),
}
COUNTS = {'base': 2_567_463_684, 'refiner': 2_259_526_660}  # diffusers' UNet2DConditionModel of each config
# The section keys a state dict fixes (heads are read by a rule, and norm_groups not at all).
STRUCTURE = ('base_channels', 'channel_mult', 'num_res_blocks', 'attention_resolutions', 'transformer_depth',
             'context_dim', 'use_linear_projection', 'adm_in_channels', 'num_head_channels', 'norm_eps',
             'flip_sin_to_cos', 'freq_shift', 'downsample_padding', 'class_conditional')


def sgm_state(state: dict, cfg: dict) -> dict:
  """diffusers UNet2DConditionModel names -> an SGM single file's (model.diffusion_model.*, label_emb.0.0/0.2 for
  the text_time add_embedding)."""
  vector = {'add_embedding.linear_1': 'label_emb.0.0', 'add_embedding.linear_2': 'label_emb.0.2'}
  out = ldm_state({k: v for k, v in state.items() if not k.startswith('add_embedding.')}, cfg)
  for key, value in state.items():
    module, _, leaf = key.rpartition('.')
    if module in vector:
      out[f'model.diffusion_model.{vector[module]}.{leaf}'] = value
  return out


@functools.cache
def unet_shapes(name: str):
  """(config, UNet, param shapes) of an SDXL config at its 128x128 latents."""
  config = RELEASED[name][0].get_config()
  model = create_model(config.model, image_size=128, in_channels=4, out_channels=4, num_classes=None)
  return config, model, param_shapes(model, 128, 4, None)


@pytest.mark.torch
def test_vector_condition_matches_diffusers_and_the_sgm_single_file(tmp_path):
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  diffusers = pytest.importorskip('diffusers', reason='diffusers is not installed')
  torch.manual_seed(0)
  model = randomize(diffusers.UNet2DConditionModel(**TINY).eval())
  model.save_pretrained(str(tmp_path / 'unet'))
  section, shape, params = sd_unet.load_diffusers(str(tmp_path / 'unet'))
  assert shape == dict(image_size=8, in_channels=4, out_channels=4, micro_embed_dim=MICRO)
  assert (section.adm_in_channels, section.transformer_depth) == (POOLED + 6 * MICRO, 2)
  gen = torch.Generator().manual_seed(1)
  x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([3, 901])
  context, pooled = torch.randn(2, 7, 32, generator=gen), torch.randn(2, POOLED, generator=gen)
  # (original h, w, crop top, left, target h, w) per example
  ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 32, 96, 1024, 1024]])
  with torch.no_grad():
    expected = model(x, t, context, added_cond_kwargs={'text_embeds': pooled, 'time_ids': ids}).sample.numpy()
  vector = jnp.concatenate([jnp.asarray(pooled.numpy()), conditioning.micro_embedding(jnp.asarray(ids.numpy()),
                                                                                      MICRO)], axis=-1)
  apply = jax.jit(functools.partial(sd_unet.build(section, shape).apply, train=False))
  run = lambda p: np.asarray(apply({'params': p}, jnp.asarray(x.numpy()).transpose(0, 2, 3, 1),
                                   jnp.asarray(t.numpy(), jnp.float32),
                                   {'context': jnp.asarray(context.numpy()), 'vector': vector})).transpose(0, 3, 1, 2)
  err = rel_err(run(params), expected)
  print(f'diffusers UNet2DConditionModel text_time: fp32 relative error {err:.2e}')
  assert err < 1e-5
  assert rel_err(run(jax.tree.map(jnp.zeros_like, params) | {k: v for k, v in params.items() if k != 'vector_emb'}),
                 expected) > 1e-2  # the vector counts

  # The same weights under SGM's names: diffusers' own single-file converter reads them back as they were...
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  sgm = sgm_state(state, TINY)
  from diffusers.loaders import single_file_utils  # pylint: disable=import-outside-toplevel
  back = single_file_utils.convert_ldm_unet_checkpoint(sgm, dict(model.config))
  assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
  # ...and jaxdiff reads the file to the same params, its layout from the shapes (heads and size by the rule).
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(sgm, str(tmp_path / 'sdxl.safetensors'))
  from_file = sd_unet.load_unet(str(tmp_path / 'sdxl.safetensors'), section, image_size=8)
  assert jax.tree.all(jax.tree.map(np.array_equal, from_file, params))
  assert rel_err(run(from_file), expected) == err
  inferred, ldm_shape = sd_unet.section_from_ldm_state_dict(common.read_safetensors(str(tmp_path / 'sdxl.safetensors')))
  assert ldm_shape == dict(image_size=128, in_channels=4, out_channels=4, micro_embed_dim=256)
  for key in STRUCTURE:
    if key not in ('attention_resolutions', 'num_head_channels'):  # image size and heads: by the rule
      assert inferred[key] == section[key], key


@pytest.mark.parametrize('name', list(RELEASED))
def test_sdxl_configs_are_the_released_unets(name):
  """Exact parameter counts, per-level transformer depths (none at the first level) and the vector MLP; the
  configs' tiny variants build."""
  config, model, shapes = unet_shapes(name)
  assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == COUNTS[name]
  assert model.adm_in_channels == {'base': 2816, 'refiner': 2560}[name]
  assert shapes['vector_emb']['linear_1']['kernel'].shape == (model.adm_in_channels, 4 * model.base_channels)
  assert shapes['vector_emb']['linear_2']['kernel'].shape == (4 * model.base_channels,) * 2
  depths = {'base': {1: 2, 2: 10, 'mid': 10}, 'refiner': {1: 4, 2: 4, 'mid': 4}}[name]
  for level in range(len(model.channel_mult)):
    for path in (f'down_{level}_attn_0', f'up_{level}_attn_0'):
      blocks = sum(k.startswith('block_') for k in shapes.get(path, {}))
      assert blocks == depths.get(level, 0), (path, blocks)
  assert sum(k.startswith('block_') for k in shapes['mid_attn']) == depths['mid']
  assert shapes['mid_attn']['block_0']['attn2']['k']['kernel'].shape[0] == config.model.context_dim
  smoke = RELEASED[name][0].get_config('smoke')
  create_model(smoke.model, image_size=smoke.data.image_size // 8, in_channels=4, out_channels=4, num_classes=None)


@pytest.mark.torch
@pytest.mark.parametrize('name', list(RELEASED))
def test_released_layouts_convert_from_diffusers_and_sgm_keys(name):
  """diffusers' released configs, built on the meta device (no memory): their counts, the section the folder
  converter reads (= the config's), and every jaxdiff parameter's source key and shape in the diffusers and SGM
  state dicts; the SGM key set alone gives the config's layout."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  diffusers = pytest.importorskip('diffusers', reason='diffusers is not installed')
  cfg = RELEASED[name][1]
  with torch.device('meta'):
    reference = diffusers.UNet2DConditionModel(**cfg)
  assert sum(p.numel() for p in reference.parameters()) == COUNTS[name]
  config, model, shapes = unet_shapes(name)
  folder, shape = sd_unet.model_section(cfg)
  assert shape == dict(image_size=128, in_channels=4, out_channels=4, micro_embed_dim=256)
  state = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  sgm = sgm_state(state, dict(cfg, layers_per_block=2))
  sgm = {k: v for k, v in sgm.items() if k.startswith('model.diffusion_model.')}
  inferred, sgm_shape = sd_unet.section_from_ldm_state_dict({k: _Shape(v) for k, v in sgm.items()})
  assert sgm_shape == shape
  for key in STRUCTURE:
    assert folder[key] == config.model[key] == inferred[key], key
  for naming, keys in (('diffusers', state), ('ldm', sgm)):
    sources = sd_unet.sources(model, naming, 'model.diffusion_model.' if naming == 'ldm' else '')
    used = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
      path = tuple(k.key for k in path)
      (source,) = sources(path)
      used.add(source)
      assert _jax_layout(path[-1], keys[source]) == leaf.shape, (naming, source)
    assert used == set(keys), sorted(set(keys) - used)[:3]


class _Shape:
  """A tensor's shape without its data, for the layout reader (which reads .shape and .ndim)."""

  def __init__(self, shape):
    self.shape, self.ndim = tuple(shape), len(shape)


def _jax_layout(leaf: str, shape: tuple) -> tuple:
  if leaf != 'kernel':
    return shape
  return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape[::-1]


def test_vector_errors():
  model = UNet(out_channels=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,),
               num_heads=4, norm_groups=8, transformer_depth=1, context_dim=16, adm_in_channels=12)
  shapes = param_shapes(model, 8, 4, None)  # a zero vector of the right width initialises it
  assert shapes['vector_emb']['linear_1']['kernel'].shape == (12, 128)
  x, t, context = jnp.ones((2, 8, 8, 4)), jnp.array([1.0, 500.0]), jnp.ones((2, 5, 16))
  cases = [({'context': context}, r"model\.adm_in_channels=12: the UNet adds an embedding of cond\['vector'\]"),
           ({'context': context, 'vector': jnp.ones((2, 10))}, r'has shape \(2, 10\); the UNet takes \[2, 12\]'),
           ({'context': context, 'vector': jnp.ones((1, 12))}, r'has shape \(1, 12\)')]
  for cond, message in cases:
    with pytest.raises(ConfigError, match=message) as err:
      model.apply({'params': {}}, x, t, cond, train=False)  # refused before any layer
    assert '\n' not in str(err.value)
  plain = model.clone(adm_in_channels=0)
  with pytest.raises(ConfigError, match=r'model\.adm_in_channels=0: this UNet takes no vector condition'):
    plain.apply({'params': {}}, x, t, {'context': context, 'vector': jnp.ones((2, 12))}, train=False)
  cfg = section_of(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), norm_groups=8,
                   num_heads=4, transformer_depth=1, context_dim=16, adm_in_channels=-1)
  with pytest.raises(ConfigError, match=r'model\.adm_in_channels=-1: use an integer >= 0'):
    create_model(cfg, image_size=8, in_channels=4, out_channels=4, num_classes=None)


def _benchmark():
  spec = importlib.util.spec_from_file_location('sdxl_memory', os.path.join(REPO, 'benchmarks', 'sdxl_memory.py'))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  return bench


def test_fsdp_divides_the_sdxl_train_state():
  """The SDXL base train state (params, EMA, Adam's moments: 38 GiB in fp32) under mesh.fsdp=8, from shapes and the
  mesh's sharding rule alone: every device holds about an eighth (the small replicated leaves add < 1%)."""
  bench = _benchmark()
  config = sdxl_base.get_config()
  *_, state = bench.abstract_train(config)
  mesh = jax.sharding.AbstractMesh((1, 8), mesh_lib.BATCH_AXES)
  sizes = bench.state_bytes(state, mesh_lib.state_sharding(state, mesh))
  whole, per_device = sizes['params']
  assert whole == 4 * COUNTS['base']
  for part in ('params', 'ema_params', 'opt_state'):
    whole, per_device = sizes[part]
    assert whole / 8 <= per_device < 1.01 * whole / 8, part
  assert 0 < sizes['opt_state'][0] - 2 * sizes['params'][0] < 64  # Adam's mu and nu, and step counts
  assert sizes['total'][1] < 5 * 2 ** 30


@pytest.mark.slow
def test_sdxl_memory_benchmark_runs_on_the_tiny_config():
  out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'sdxl_memory.py'),
                        '--config=configs/sdxl_base.py:smoke', '--json'], check=True, capture_output=True, text=True,
                       cwd=REPO, timeout=900).stdout
  row = json.loads(out.strip().splitlines()[-1])
  assert row['devices'] == row['fsdp'] == 8 and row['batch'] == 8 and row['compile_s'] > 0
  assert row['bytes']['total'][1] < row['bytes']['total'][0] and row['memory_analysis']['temp'] > 0
  text = _benchmark().table(row)
  assert '| params |' in text and '| train step | lower s | compile s |' in text
