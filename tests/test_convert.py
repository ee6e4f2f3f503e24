"""Tests for jaxdiff.convert: parity with the PyTorch references, key/shape checks, bad files, the CLI path."""

import functools
import importlib
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import adm_imagenet64
from jaxdiff import convert
from jaxdiff.convert import common
from jaxdiff.errors import CheckpointError

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'guided_diffusion')
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'scripts', 'make_guided_diffusion_fixtures.py')
WEIGHTS = os.path.join(FIXTURES, 'tiny_adm.safetensors')


def fixture_script():
  spec = importlib.util.spec_from_file_location('make_guided_diffusion_fixtures', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def model_config(flags: dict) -> ml_collections.ConfigDict:
  """The jaxdiff model section of guided-diffusion UNetModel keyword arguments."""
  config = adm_imagenet64.get_config()
  m = config.model
  m.base_channels, m.channel_mult = flags['model_channels'], tuple(flags['channel_mult'])
  m.num_res_blocks, m.dropout = flags['num_res_blocks'], flags.get('dropout', 0.0)
  m.attention_resolutions = tuple(flags['image_size'] // ds for ds in flags['attention_resolutions'])
  m.num_heads, m.num_head_channels = flags.get('num_heads', 1), flags.get('num_head_channels', -1)
  m.legacy_qkv_order = not flags.get('use_new_attention_order', False)
  m.use_scale_shift_norm = flags.get('use_scale_shift_norm', False)
  m.resblock_updown = flags.get('resblock_updown', False)
  m.conv_resample = flags.get('conv_resample', True)
  return m


def apply_nchw(converted, x, t, y, dtype='float32'):
  cfg = ml_collections.ConfigDict(converted.model_config.to_dict())
  cfg.dtype = dtype
  from jaxdiff.models import create_model  # pylint: disable=import-outside-toplevel
  model = create_model(cfg, image_size=converted.image_size, in_channels=converted.in_channels,
                       out_channels=converted.out_channels, num_classes=cfg.num_classes or None)
  out = jax.jit(functools.partial(model.apply, train=False))(
      {'params': converted.params}, jnp.asarray(x).transpose(0, 2, 3, 1), jnp.asarray(t, jnp.float32),
      None if y is None else {'label': jnp.asarray(y)})
  return np.asarray(out).transpose(0, 3, 1, 2)


# guided-diffusion reference numbers stored in tests/fixtures (no torch or guided-diffusion source needed).

@functools.cache
def fixture():
  with open(os.path.join(FIXTURES, 'tiny_adm.json')) as f:
    return json.load(f), dict(np.load(os.path.join(FIXTURES, 'tiny_adm_io.npz')))


@pytest.mark.parametrize('order', ['new_order', 'legacy_order'])
def test_guided_diffusion_fixture_parity(order):
  flags, io = fixture()
  converted = convert.load_guided_diffusion(WEIGHTS, model_config(flags[order]), image_size=16)
  assert converted.model_config.num_classes == 10 and converted.out_channels == 6
  err = rel_err(apply_nchw(converted, io['x'], io['t'], io['y']), io[order])
  print(f'guided-diffusion fixture {order}: fp32 relative error {err:.2e}')
  assert err < 1e-5


def test_guided_diffusion_fixture_bf16():
  flags, io = fixture()
  converted = convert.load_guided_diffusion(WEIGHTS, model_config(flags['new_order']), image_size=16)
  err = rel_err(apply_nchw(converted, io['x'], io['t'], io['y'], dtype='bfloat16'), io['new_order'])
  print(f'guided-diffusion fixture: bf16 compute vs fp32 reference relative error {err:.2e}')
  assert err < 1e-2  # measured 8.1e-3 (every weight random, the zero-initialised convs included)


@pytest.mark.parametrize('change, message', [
    (dict(num_res_blocks=2), r'\d+ missing \(input_blocks\.\d.*'),
    (dict(attention_resolutions=(16,)), r'\d+ unexpected \(.*attention|\d+ unexpected \(.*\.(norm|qkv|proj_out)\.'),
    (dict(base_channels=64), r'\d+ mis-shaped \(.*input_blocks\.0\.0\.weight \(32, 3, 3, 3\)'),
    (dict(use_scale_shift_norm=False), r'mis-shaped \(.*emb_layers\.1\.'),
    (dict(resblock_updown=False), r'missing \(.*\.op\.weight'),
    (dict(flip_sin_to_cos=False), r'model\.flip_sin_to_cos=True'),
])
def test_guided_diffusion_wrong_config(change, message):
  flags, _ = fixture()
  cfg = model_config(flags['new_order'])
  cfg.update(change)
  with pytest.raises(CheckpointError, match=message) as err:
    convert.load_guided_diffusion(WEIGHTS, cfg, image_size=16)
  assert '\n' not in str(err.value)


def test_attention_flags_a_state_dict_cannot_tell(caplog, monkeypatch):
  from jaxdiff.convert import common, guided_diffusion  # pylint: disable=import-outside-toplevel
  flags, _ = fixture()
  cfg = model_config(flags['new_order'])
  convert.load_guided_diffusion(WEIGHTS, cfg, image_size=16)  # an unknown file: the assumed values are named
  assert 'cannot tell the attention layout' in caplog.text and 'model.legacy_qkv_order=False' in caplog.text
  # A released checkpoint (known by its parameter count) under the wrong flags is refused.
  count = sum(v.size for v in common.read_safetensors(WEIGHTS).values())
  monkeypatch.setitem(guided_diffusion.RELEASES, count, ('a release', dict(num_head_channels=-1, num_heads=1,
                                                                           legacy_qkv_order=True)))
  with pytest.raises(CheckpointError, match=r"is guided-diffusion's a release .* the config has "
                                            r"model.num_head_channels=16, model.legacy_qkv_order=False"):
    convert.load_guided_diffusion(WEIGHTS, cfg, image_size=16)


@pytest.mark.parametrize('config_name,class_conditional', [('adm_imagenet64', True), ('adm_imagenet128', True),
                                                           ('adm_imagenet256', True), ('adm_imagenet256', False)])
def test_release_table_matches_the_configs(config_name, class_conditional):
  """The parameter counts that identify released checkpoints are those of the configs that load them, whose
  attention flags agree with the table."""
  from jaxdiff import models  # pylint: disable=import-outside-toplevel
  from jaxdiff.convert import guided_diffusion  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f'configs.{config_name}').get_config()
  num_classes = 1000 if class_conditional else None
  model = models.create_model(config.model, image_size=config.data.image_size, in_channels=3, out_channels=6,
                              num_classes=num_classes)
  shapes = models.param_shapes(model, config.data.image_size, 3, num_classes)
  name, flags = guided_diffusion.RELEASES[sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))]
  assert config_name.removeprefix('adm_imagenet') in name
  for key, value in flags.items():
    if key != 'num_heads' or flags.get('num_head_channels', -1) == -1:
      assert config.model[key] == value, (key, name)


def test_truncated_and_foreign_files(tmp_path):
  data = open(WEIGHTS, 'rb').read()
  cases = {'truncated.safetensors': data[:len(data) // 2], 'header_only.safetensors': data[:100],
           'empty.safetensors': b'', 'garbage.safetensors': b'\xff' * 64}
  for name, content in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=r'truncated|not a safetensors|corrupt') as err:
      common.read_state_dict(str(tmp_path / name))
    assert '\n' not in str(err.value) and name in str(err.value)
  with pytest.raises(CheckpointError, match='No checkpoint file'):
    common.read_state_dict(str(tmp_path / 'absent.pt'))
  flags, _ = fixture()
  renamed = tmp_path / 'renamed.safetensors'
  write_safetensors({f'model.{k}': v for k, v in common.read_safetensors(WEIGHTS).items()}, renamed)
  with pytest.raises(CheckpointError, match='not a guided-diffusion UNetModel'):
    convert.load_guided_diffusion(str(renamed), model_config(flags['new_order']), image_size=16)


def write_safetensors(state, path):
  header, offset, blobs = {}, 0, []
  for name, value in state.items():
    blob = np.ascontiguousarray(value).tobytes()
    header[name] = {'dtype': 'F16' if value.dtype == np.float16 else 'F32', 'shape': list(value.shape),
                    'data_offsets': [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  head = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(len(head).to_bytes(8, 'little') + head + b''.join(blobs))


# diffusers UNet2DModel with random weights (the torch extra).

DDPM_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
                    up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'), layers_per_block=2,
                    attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
                    freq_shift=1, dropout=0.1)
REDUCED = dict(DDPM_CIFAR10, block_out_channels=(32, 64, 64, 64))
# Every other UNet2DModel option jaxdiff expresses: heads of 16, symmetric padding, classes, mid scale.
GENERAL = dict(REDUCED, down_block_types=('AttnDownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
               up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D'), attention_head_dim=16,
               downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
               num_class_embeds=7, norm_eps=1e-5, mid_block_scale_factor=2 ** 0.5, layers_per_block=1)


def diffusers_folder(tmp_path, cfg, randomize=True):
  """A saved UNet2DModel: every weight random (randomize), or PyTorch's default init, which has no zero layers."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  diffusers = pytest.importorskip('diffusers', reason='diffusers is not installed')
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(**cfg).eval()
  if randomize:
    fixture_script().randomize(model, seed=0)
  model.save_pretrained(str(tmp_path))  # config.json + diffusion_pytorch_model.safetensors
  return torch, model


def check_diffusers(tmp_path, cfg, batches, seeds, dtype='float32', randomize=True):
  """Relative errors of jaxdiff (in `dtype`) against the float32 PyTorch model; for bfloat16 also PyTorch's own
  (autocast), as pairs."""
  torch, model = diffusers_folder(tmp_path, cfg, randomize)
  converted = convert.load_diffusers(str(tmp_path))
  errors = []
  for batch, seed in zip(batches, seeds):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    t[0] = 999 if seed % 2 else 0
    y = torch.randint(0, cfg['num_class_embeds'], (batch,), generator=gen) if 'num_class_embeds' in cfg else None
    with torch.no_grad():
      ref = model(x, t, class_labels=y).sample.numpy()
      with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
        torch_out = model(x, t, class_labels=y).sample.float().numpy()
    err = rel_err(apply_nchw(converted, x.numpy(), t.numpy(), None if y is None else y.numpy(), dtype), ref)
    errors.append((err, rel_err(torch_out, ref)) if dtype == 'bfloat16' else err)
  return errors


@pytest.mark.torch
@pytest.mark.parametrize('name, cfg', [('ddpm_reduced', REDUCED), ('general', GENERAL)])
def test_diffusers_parity(tmp_path, name, cfg):
  errors = check_diffusers(tmp_path, cfg, batches=(1, 3, 2), seeds=(0, 1, 2))
  print(f'diffusers {name}: fp32 relative errors {", ".join(f"{e:.2e}" for e in errors)}')
  assert max(errors) < 1e-5


@pytest.mark.torch
def test_diffusers_bf16(tmp_path):
  [(err, torch_err)] = check_diffusers(tmp_path, REDUCED, batches=(3,), seeds=(0,), dtype='bfloat16',
                                       randomize=False)
  print(f'diffusers ddpm_reduced, default init: bf16 compute vs fp32 reference relative error: jaxdiff {err:.2e}, '
        f'PyTorch autocast {torch_err:.2e}')
  # Measured 7.6e-3 against PyTorch autocast's 1.30e-2: rounding the operands of every conv and matmul sets the floor.
  assert err < 1e-2 and err < torch_err


@pytest.mark.torch
@pytest.mark.slow
def test_diffusers_parity_full_width(tmp_path):
  errors = check_diffusers(tmp_path, DDPM_CIFAR10, batches=(2, 1), seeds=(0, 1))
  print(f'diffusers DDPM CIFAR-10 full width: fp32 relative errors {", ".join(f"{e:.2e}" for e in errors)}')
  assert convert.load_diffusers(str(tmp_path)).params['conv_out']['kernel'].shape == (3, 3, 128, 3)
  assert max(errors) < 1e-5


@pytest.mark.torch
@pytest.mark.skipif(not os.environ.get('GUIDED_DIFFUSION_PATH'), reason='GUIDED_DIFFUSION_PATH is not set')
@pytest.mark.parametrize('options', [
    dict(),  # the fixture's network: every ADM option on
    dict(resblock_updown=False, use_scale_shift_norm=False, num_heads=2, use_new_attention_order=False),
    dict(resblock_updown=False, conv_resample=False, channel_mult=(1, 2), num_res_blocks=2),
])
def test_guided_diffusion_source_parity(tmp_path, options):
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  script = fixture_script()
  flags = {**script.FLAGS['new_order'], **options}
  model = script.randomize(script.import_unet(os.environ['GUIDED_DIFFUSION_PATH'])(**flags).eval(), seed=3)
  path = tmp_path / 'model.pt'
  torch.save(model.state_dict(), path)
  converted = convert.load_guided_diffusion(str(path), model_config(flags), image_size=16)
  gen = torch.Generator().manual_seed(4)
  x, t, y = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([5, 900]), torch.tensor([1, 8])
  with torch.no_grad():
    ref = model(x, t, y).numpy()
  err = rel_err(apply_nchw(converted, x.numpy(), t.numpy(), y.numpy()), ref)
  print(f'guided-diffusion source {options}: fp32 relative error {err:.2e}')
  assert err < 1e-5


@pytest.mark.torch
def test_truncated_torch_file(tmp_path):
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  path = tmp_path / 'model.pt'
  torch.save({'w': torch.ones(1000)}, path)
  path.write_bytes(path.read_bytes()[:300])
  with pytest.raises(CheckpointError, match='not a readable PyTorch state dict') as err:
    common.read_state_dict(str(path))
  assert '\n' not in str(err.value)
