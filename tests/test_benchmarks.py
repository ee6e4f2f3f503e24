"""benchmarks/compare_pytorch.py at a tiny size, so the script keeps working as jaxdiff changes."""

import importlib.util
import json
import os

import numpy as np
import pytest

from helpers import REPO


@pytest.mark.torch
def test_compare_pytorch_tiny(tmp_path):
  pytest.importorskip('torch', reason='the torch extra is not installed')
  pytest.importorskip('diffusers', reason='diffusers is not installed')
  path = os.path.join(REPO, 'benchmarks', 'compare_pytorch.py')
  spec = importlib.util.spec_from_file_location('compare_pytorch', path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  net = dict(bench.NETWORKS['adm_imagenet64'], sample_size=16, block_out_channels=(32, 32), layers_per_block=1,
             down_block_types=('DownBlock2D', 'AttnDownBlock2D'), up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
             attention_head_dim=16, num_class_embeds=3)
  s = bench.Settings(batch=2, sample_batch=2, ddim_steps=2, ancestral_steps=2, train_reps=1, sample_reps=1,
                     torch_compile=False)
  rows = bench.benchmark('tiny', net, s, str(tmp_path), given_peak=1.0)
  names = [r.name for r in rows]
  for name in ('train step (batch 2)', 'DDIM 2 steps (batch 2)', 'ancestral 2 steps (batch 2)'):
    assert name in names
  for r in rows:
    if r.unit in ('s', 'img/s'):
      assert r.jax > 0 and (r.torch == '-' or r.torch > 0), r
  assert 'MFU' in rows[4].jax
  text = bench.table({'tiny': rows})
  assert text.count('\n') == len(rows) + 1 and '| tiny | train step (batch 2) |' in text


def test_table_ratios_against_eager_and_the_best_pytorch_variant():
  path = os.path.join(REPO, 'benchmarks', 'compare_pytorch.py')
  spec = importlib.util.spec_from_file_location('compare_pytorch_table', path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rows = [bench.Result('train step', 's', 2.0, 4.0, 1.0), bench.Result('train images/s', 'img/s', 3.0, 1.0, 6.0),
          bench.Result('DDIM', 's', 1.0, 2.0)]
  lines = bench.table({'net': rows}).splitlines()[2:]
  assert lines[0].endswith('| 0.50 | 2.00 |') and lines[1].endswith('| 3.00 | 0.50 |')
  assert lines[2].endswith('| 0.50 | 0.50 |')


@pytest.mark.slow
def test_guidance_demo_smoke(tmp_path):
  """benchmarks/guidance_demo.py end to end on smoke configs (the capability itself is tested in test_guidance*)."""
  path = os.path.join(REPO, 'benchmarks', 'guidance_demo.py')
  spec = importlib.util.spec_from_file_location('guidance_demo', path)
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  rows, times = demo.main(['--part', 'classifier', '--smoke', '--num-samples', '10', '--workdir', str(tmp_path)])
  assert len(rows) == 4 and 'accuracy' not in rows[0] and all(0 <= r['accuracy'] <= 1 for r in rows[1:])
  assert 'train noisy classifier' in times and os.path.exists(tmp_path / 'classifier_grid.png')


@pytest.mark.slow
def test_autoencoder_demo_smoke(tfds_dir, tmp_path):
  """benchmarks/autoencoder_demo.py end to end on the smoke configs (the job itself is tested in
  test_autoencoder_jobs.py)."""
  path = os.path.join(REPO, 'benchmarks', 'autoencoder_demo.py')
  spec = importlib.util.spec_from_file_location('autoencoder_demo', path)
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  demo.main(['--part', 'vq', '--smoke', '--workdir', str(tmp_path), '--data_dir', tfds_dir])
  with open(tmp_path / 'vq' / 'vq_demo.json') as f:
    result = json.load(f)
  assert result['held_out_digits'] == 500 and result['step'] == 4 and result['train_seconds'] > 0
  assert 0 <= result['judge_accuracy_reconstructions'] <= 1 and result['rfd_judge'] >= 0
  assert os.path.exists(tmp_path / 'vq' / 'autoencoder_vq.png')


@pytest.mark.slow
def test_ldm_demo_smoke(tfds_dir, tmp_path):
  """benchmarks/ldm_demo.py end to end on the smoke configs (the job itself is tested in test_latent_diffusion.py)."""
  path = os.path.join(REPO, 'benchmarks', 'ldm_demo.py')
  spec = importlib.util.spec_from_file_location('ldm_demo', path)
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  row, times = demo.main(['--smoke', '--num-samples', '20', '--workdir', str(tmp_path), '--data_dir', tfds_dir])
  assert 0 <= row['accuracy'] <= 1 and row['n'] == 20 and np.isfinite(row['fd'])
  assert set(times) == {'train autoencoder', 'train latent diffusion', 'sample'}
  assert os.path.exists(tmp_path / 'ldm_grid.png')
