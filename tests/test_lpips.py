"""LPIPS and the PatchGAN discriminator against PyTorch references of the same networks on the same random weights,
weight files in every supported format, and the adversarial losses against their torch formulas."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import CheckpointError
from jaxdiff.models import discriminator as disc_lib
from jaxdiff.models import lpips as lpips_lib

torch = pytest.importorskip('torch', reason='the parity references need the torch extra')
pytestmark = pytest.mark.torch
F = torch.nn.functional


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.abs(got - want).max() / np.abs(want).max()


# ---------------------------------------------------------------------------------------------------------------------
# LPIPS


def random_lpips_state_dicts(seed=0):
  """Random torchvision-VGG16 and lpips-head state dicts (with VGG's unused classifier), He-scaled so the deep taps
  stay alive."""
  rng = np.random.default_rng(seed)
  vgg_shapes, head_shapes = lpips_lib.expected_shapes()
  vgg = {}
  for key, shape in vgg_shapes.items():
    if key.endswith('weight'):
      vgg[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
    else:
      vgg[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  vgg['classifier.0.weight'] = rng.standard_normal((8, 4)).astype(np.float32)
  heads = {key: np.abs(rng.standard_normal(shape)).astype(np.float32) / shape[1] for key, shape in head_shapes.items()}
  return vgg, heads


def torch_lpips(vgg, heads, x, y):
  """LPIPS v0.1 'vgg' in torch (NCHW), written from the published network description: scaling layer, the VGG16
  relu taps, channel-unit normalisation, 1x1 heads, spatial mean, sum over taps."""
  shift = torch.tensor(lpips_lib.SHIFT).view(1, 3, 1, 1)
  scale = torch.tensor(lpips_lib.SCALE).view(1, 3, 1, 1)

  def taps(v):
    out, index = [], 0
    for stage, widths in enumerate(lpips_lib.VGG16_STAGES):
      if stage:
        v = F.max_pool2d(v, 2, 2)
      for _ in widths:
        v = F.relu(F.conv2d(v, vgg[f'features.{index}.weight'], vgg[f'features.{index}.bias'], padding=1))
        index += 2
      index += 1
      out.append(v)
    return out

  if x.shape[1] == 1:
    x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
  total = 0
  for k, (fx, fy) in enumerate(zip(taps((x - shift) / scale), taps((y - shift) / scale))):
    fx = fx / (torch.sqrt(torch.sum(fx ** 2, dim=1, keepdim=True)) + 1e-10)
    fy = fy / (torch.sqrt(torch.sum(fy ** 2, dim=1, keepdim=True)) + 1e-10)
    total = total + F.conv2d((fx - fy) ** 2, heads[f'lin{k}.model.1.weight']).mean(dim=(2, 3))
  return total[:, 0]


@pytest.fixture(scope='module')
def lpips_setup():
  vgg, heads = random_lpips_state_dicts()
  params = lpips_lib.convert_lpips_state_dicts(vgg, heads)
  to_torch = lambda d: {k: torch.from_numpy(v) for k, v in d.items()}
  return vgg, heads, to_torch(vgg), to_torch(heads), params


@pytest.fixture(scope='module')
def lpips_fns():
  model = lpips_lib.LPIPS()
  forward = jax.jit(lambda p, x, y: model.apply({'params': p}, x, y))
  grad = jax.jit(jax.grad(lambda p, x, y: jnp.sum(model.apply({'params': p}, x, y)), argnums=1))
  return forward, grad


@pytest.mark.parametrize('channels', [3, 1])
def test_lpips_matches_torch_reference(lpips_setup, lpips_fns, channels):
  _, _, tvgg, theads, params = lpips_setup
  forward, grad = lpips_fns
  rng = np.random.default_rng(channels)
  x, y = (rng.uniform(-1, 1, (2, channels, 64, 64)).astype(np.float32) for _ in range(2))
  tx = torch.from_numpy(x).requires_grad_(True)
  want = torch_lpips(tvgg, theads, tx, torch.from_numpy(y))
  want.sum().backward()
  nhwc = lambda v: jnp.asarray(v.transpose(0, 2, 3, 1))
  got = forward(params, nhwc(x), nhwc(y))
  assert got.shape == (2,)
  assert rel_err(got, want.detach().numpy()) < 1e-5
  got_grad = np.asarray(grad(params, nhwc(x), nhwc(y))).transpose(0, 3, 1, 2)
  # Norm-relative: a near-tie in a 2x2 max-pool, which torch's thread count can flip, routes one element's gradient
  # elsewhere (seen once in a full run: 6.7e-3 of the largest element), a wrong gradient is off by O(1).
  want_grad = tx.grad.numpy().astype(np.float64)
  assert np.linalg.norm(got_grad - want_grad) / np.linalg.norm(want_grad) < 1e-3


def test_lpips_identical_images_zero_with_finite_gradient(lpips_setup, lpips_fns):
  params = lpips_setup[-1]
  forward, grad = lpips_fns
  x = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
  np.testing.assert_allclose(forward(params, x, x), 0.0, atol=1e-7)
  # An all-black image drives whole taps to zero, where the channel norm's sqrt has an infinite derivative.
  assert np.isfinite(np.asarray(grad(params, -jnp.ones_like(x), x))).all()


def _save(state, path):
  if path.suffix == '.npz':
    np.savez(path, **state)
  elif path.suffix == '.safetensors':
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file(state, str(path))
  else:
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors', '.npz'])
def test_load_lpips_params_round_trip(lpips_setup, tmp_path, suffix):
  vgg, heads, _, _, params = lpips_setup
  vgg_path, heads_path = tmp_path / f'vgg16{suffix}', tmp_path / f'heads{suffix}'
  _save(vgg, vgg_path)
  _save(heads, heads_path)
  loaded = lpips_lib.load_lpips_params(str(vgg_path), str(heads_path))
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
  shapes = jax.eval_shape(lpips_lib.LPIPS().init, jax.random.key(0), *[jnp.zeros((1, 32, 32, 3))] * 2)['params']
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, loaded)
  assert sum(np.size(leaf) for leaf in jax.tree.leaves(loaded)) == 14_714_688 + 1_472  # torchvision's VGG16 features


def test_load_lpips_params_bad_files(lpips_setup, tmp_path):
  vgg, heads = lpips_setup[:2]
  good_vgg, good_heads = tmp_path / 'vgg.npz', tmp_path / 'heads.npz'
  _save(vgg, good_vgg)
  _save(heads, good_heads)

  missing = tmp_path / 'missing.npz'
  _save({k: v for k, v in vgg.items() if k != 'features.28.bias'}, missing)
  with pytest.raises(CheckpointError, match=r'missing\.npz .*1 missing \(features\.28\.bias\)'):
    lpips_lib.load_lpips_params(str(missing), str(good_heads))

  misshaped = tmp_path / 'alex_heads.npz'
  _save({**heads, 'lin1.model.1.weight': np.zeros((1, 192, 1, 1), np.float32)}, misshaped)
  with pytest.raises(CheckpointError, match=r'alex_heads\.npz .*mis-shaped \(lin1\.model\.1\.weight \(1, 192, 1, 1\)'):
    lpips_lib.load_lpips_params(str(good_vgg), str(misshaped))

  with pytest.raises(CheckpointError, match=r'heads\.npz is not torchvision.*as vgg_path\.$'):  # files swapped
    lpips_lib.load_lpips_params(str(good_heads), str(good_vgg))
  with pytest.raises(CheckpointError, match=r'vgg\.npz is not the lpips .*5 missing.*as heads_path\.$'):
    lpips_lib.load_lpips_params(str(good_vgg), str(good_vgg))

  for name, content in [('junk.pth', b'not a checkpoint'), ('junk.npz', b'PK junk'), ('junk.safetensors', b'\x01')]:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=name.replace('.', r'\.')):
      lpips_lib.load_lpips_params(str(tmp_path / name), str(good_heads))
  with pytest.raises(CheckpointError, match='No checkpoint file'):
    lpips_lib.load_lpips_params(str(tmp_path / 'absent.npz'), str(good_heads))


# ---------------------------------------------------------------------------------------------------------------------
# Discriminator


def torch_discriminator(in_channels, base, num_layers):
  """taming-transformers' NLayerDiscriminator layout (BatchNorm variant) from torch.nn, with its weights_init."""
  nn = torch.nn
  layers = [nn.Conv2d(in_channels, base, 4, 2, 1), nn.LeakyReLU(0.2)]
  width = base
  for k in range(1, num_layers + 1):
    out = base * min(2 ** k, 8)
    layers += [nn.Conv2d(width, out, 4, 2 if k < num_layers else 1, 1, bias=False), nn.BatchNorm2d(out),
               nn.LeakyReLU(0.2)]
    width = out
  layers.append(nn.Conv2d(width, 1, 4, 1, 1))
  net = nn.Sequential(*layers)
  for m in net:
    if isinstance(m, nn.Conv2d):
      nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.normal_(m.weight, 1.0, 0.02)
      nn.init.normal_(m.bias, 0.0, 0.1)  # non-zero, so the bias mapping is tested
  return nn.Sequential(collections.OrderedDict(main=net))  # state dict keys main.{i}.*, as taming's


@pytest.mark.parametrize('num_layers,channels,size', [(2, 1, 32), (3, 3, 64), (3, 1, 64), (2, 3, 32)])
def test_discriminator_matches_torch_reference(num_layers, channels, size):
  torch.manual_seed(num_layers * 10 + channels)
  net = torch_discriminator(channels, 16, num_layers).train()
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  model = disc_lib.NLayerDiscriminator(base_channels=16, num_layers=num_layers)
  params = disc_lib.convert_discriminator(state)
  assert jax.tree.map(np.shape, params) == jax.tree.map(
      lambda s: s.shape, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, channels)))['params'])
  x = np.random.default_rng(size).standard_normal((2, channels, size, size)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  got = jax.jit(model.apply)({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert got.shape == want.shape == (2, size // 2 ** num_layers - 2, size // 2 ** num_layers - 2, 1)
  assert rel_err(got, want) < 1e-5


def test_discriminator_init_and_dtype():
  model = disc_lib.NLayerDiscriminator(base_channels=32, num_layers=3)
  x = jnp.zeros((2, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(0), x)['params']
  assert set(params) == {'conv0', 'conv1', 'conv2', 'conv3', 'conv4', 'norm1', 'norm2', 'norm3'}
  assert 'bias' not in params['conv1'] and 'bias' in params['conv4']
  kernel = np.asarray(params['conv2']['kernel'])
  assert abs(kernel.std() - 0.02) < 2e-3 and abs(kernel.mean()) < 2e-3
  assert abs(np.asarray(params['norm2']['scale']).mean() - 1) < 5e-3 and not np.asarray(params['norm2']['bias']).any()
  # bf16 compute keeps float32 parameters (shapes only: bf16 convolutions are slow to run on CPU).
  bf16 = disc_lib.NLayerDiscriminator(base_channels=32, num_layers=3, dtype=jnp.bfloat16)
  out = jax.eval_shape(bf16.apply, {'params': params}, x)
  assert out.shape == (2, 2, 2, 1) and out.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(jax.eval_shape(bf16.init, jax.random.key(0), x)))


def test_convert_discriminator_rejects_wrong_state_dicts():
  state = {k: v.numpy() for k, v in torch_discriminator(3, 16, 3).state_dict().items()}
  with pytest.raises(CheckpointError, match=r'1 missing \(main\.3\.weight\)'):
    disc_lib.convert_discriminator({k: v for k, v in state.items() if k != 'main.3.weight'})
  with pytest.raises(CheckpointError, match=r'mis-shaped \(main\.5\.weight'):
    disc_lib.convert_discriminator({**state, 'main.5.weight': np.zeros((64, 16, 4, 4), np.float32)})
  with pytest.raises(CheckpointError, match='mis-shaped'):  # a 3-layer state dict for a 2-layer model
    disc_lib.convert_discriminator(state, disc_lib.NLayerDiscriminator(base_channels=16, num_layers=2))
  with pytest.raises(CheckpointError, match='main.0.weight'):
    disc_lib.convert_discriminator({'lin0.model.1.weight': np.zeros((1, 64, 1, 1))})


def test_adversarial_losses_match_torch():
  rng = np.random.default_rng(0)
  real, fake = rng.standard_normal((2, 3, 6, 6, 1)).astype(np.float32) * 2
  tr, tf = torch.from_numpy(real), torch.from_numpy(fake)
  hinge = 0.5 * (torch.mean(F.relu(1.0 - tr)) + torch.mean(F.relu(1.0 + tf)))
  vanilla = 0.5 * (torch.mean(F.softplus(-tr)) + torch.mean(F.softplus(tf)))
  np.testing.assert_allclose(jax.jit(disc_lib.hinge_d_loss)(real, fake), hinge.item(), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(disc_lib.vanilla_d_loss)(real, fake), vanilla.item(), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(disc_lib.generator_loss)(fake), -torch.mean(tf).item(), rtol=1e-6)
