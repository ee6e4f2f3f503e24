"""The conversion paths as a user runs them: `python -m jaxdiff.convert` then `sample.py --workdir`, and
`sample.py --config.model.init_from`, on a diffusers folder and on guided-diffusion .pt / .safetensors files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO
from test_convert import FIXTURES, WEIGHTS, fixture_script

# Smoke sampling: 2 samples in one batch, 10 steps (given to the converter too: it fixes the saved state's shapes).
SAMPLE = ['--config.sample.num_samples=2', '--config.sample.per_device_batch_size=2']
STEPS = '--config.diffusion.num_timesteps=10'
# A diffusers UNet2DModel matching configs/ddpm_cifar10.py:smoke (16/32 channels, attention at 16x16, 8 groups).
DIFFUSERS_SMOKE = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
                       up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=None, norm_eps=1e-6,
                       downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)


def run(*args):
  result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def sample_npz(workdir, *args):
  run('sample.py', f'--workdir={workdir}', *args, *SAMPLE)
  summary = json.load(open(os.path.join(workdir, 'sample_summary.json')))
  with np.load(summary['npz']) as f:
    return {k: f[k] for k in f.files}


def convert_then_sample(tmp_path, source, config_args):
  """(samples via a written jaxdiff checkpoint, samples from init_from) for the same weights and seed."""
  convert = run('-m', 'jaxdiff.convert', f'--from={source[0]}', f'--workdir={tmp_path / "a"}', *config_args)
  assert 'Wrote' in convert.stdout and os.path.isdir(tmp_path / 'a' / 'checkpoints' / '0')
  restored = sample_npz(tmp_path / 'a', *config_args)
  direct = sample_npz(tmp_path / 'b', *config_args, f'--config.model.init_from={source[1]}')
  return restored, direct


def guided_config_args():
  """configs/adm_imagenet64.py overridden to the fixture's tiny ADM."""
  with open(os.path.join(FIXTURES, 'tiny_adm.json')) as f:
    flags = json.load(f)['new_order']
  size = flags['image_size']
  return ['--config=configs/adm_imagenet64.py', STEPS, f'--config.data.image_size={size}',
          f'--config.model.base_channels={flags["model_channels"]}',
          f'--config.model.channel_mult={tuple(flags["channel_mult"])}',
          f'--config.model.num_res_blocks={flags["num_res_blocks"]}',
          f'--config.model.attention_resolutions={tuple(size // ds for ds in flags["attention_resolutions"])}',
          f'--config.model.num_head_channels={flags["num_head_channels"]}',
          f'--config.model.num_classes={flags["num_classes"]}', '--config.model.dropout=0.0']


@pytest.mark.torch
def test_guided_diffusion_pt_and_safetensors(tmp_path):
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  from jaxdiff.convert import common  # pylint: disable=import-outside-toplevel
  pt = tmp_path / 'tiny_adm.pt'
  torch.save({k: torch.from_numpy(v.copy()) for k, v in common.read_safetensors(WEIGHTS).items()}, pt)
  # (a) converts the .pt, (b) samples from the .safetensors holding the same weights.
  restored, direct = convert_then_sample(tmp_path, (pt, WEIGHTS), guided_config_args())
  assert restored['arr_0'].shape == (2, 16, 16, 3) and restored['arr_0'].dtype == np.uint8
  np.testing.assert_array_equal(restored['arr_1'], [0, 1])  # labels cycle through the classes
  assert restored['arr_0'].std() > 0
  for key in restored:
    np.testing.assert_array_equal(restored[key], direct[key])


@pytest.mark.torch
def test_diffusers_folder(tmp_path):
  pytest.importorskip('torch', reason='the torch extra is not installed')
  diffusers = pytest.importorskip('diffusers', reason='diffusers is not installed')
  folder = tmp_path / 'ddpm'
  fixture_script().randomize(diffusers.UNet2DModel(**DIFFUSERS_SMOKE).eval(), seed=0).save_pretrained(str(folder))
  restored, direct = convert_then_sample(tmp_path, (folder, folder), ['--config=configs/ddpm_cifar10.py:smoke', STEPS])
  assert set(restored) == {'arr_0'} and restored['arr_0'].shape == (2, 32, 32, 3)
  assert restored['arr_0'].std() > 0
  np.testing.assert_array_equal(restored['arr_0'], direct['arr_0'])


def test_convert_refuses_a_workdir_with_checkpoints(tmp_path):
  from test_convert import WEIGHTS  # pylint: disable=import-outside-toplevel
  args = ['-m', 'jaxdiff.convert', f'--from={WEIGHTS}', f'--workdir={tmp_path}', *guided_config_args()]
  run(*args)
  before = sorted(os.listdir(tmp_path / 'checkpoints' / '0'))
  again = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 1 and 'Traceback' not in again.stderr
  errors = [line for line in again.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'already holds checkpoints (steps [0])' in errors[0] and 'new --workdir' in errors[0]
  assert sorted(os.listdir(tmp_path / 'checkpoints' / '0')) == before


@pytest.mark.torch
def test_adm_g_with_a_guided_diffusion_classifier_file(tmp_path):
  """ADM-G as the README runs it, at fixture size: the diffusion model from init_from, the noisy classifier from a
  guided-diffusion .pt (classifier_from, its flags in the classifier section), respaced ancestral sampling."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  from jaxdiff.convert import common  # pylint: disable=import-outside-toplevel
  with open(os.path.join(FIXTURES, 'classifier_nets.json')) as f:
    flags = json.load(f)['attention_new']
  state = {k.split('/', 1)[1]: v for k, v in common.read_safetensors(
      os.path.join(FIXTURES, 'classifier_nets.safetensors')).items() if k.startswith('attention_new/')}
  classifier = tmp_path / 'tiny_classifier.pt'
  torch.save({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}, classifier)
  size = flags['image_size']
  classifier_args = [
      f'--config.classifier.base_channels={flags["model_channels"]}',
      f'--config.classifier.channel_mult={tuple(flags["channel_mult"])}',
      f'--config.classifier.num_res_blocks={flags["num_res_blocks"]}',
      f'--config.classifier.attention_resolutions={tuple(size // ds for ds in flags["attention_resolutions"])}',
      f'--config.classifier.num_head_channels={flags["num_head_channels"]}',
      '--config.classifier.legacy_qkv_order=False', f'--config.model.init_from={WEIGHTS}',
      f'--config.sample.classifier_from={classifier}', '--config.sample.timestep_respacing=5']
  guided = sample_npz(tmp_path / 'guided', *guided_config_args(), *classifier_args,
                      '--config.sample.classifier_scale=10.0')
  plain = sample_npz(tmp_path / 'plain', *guided_config_args(), *classifier_args)
  np.testing.assert_array_equal(guided['arr_1'], [0, 1])
  assert guided['arr_0'].shape == (2, 16, 16, 3) and not np.array_equal(guided['arr_0'], plain['arr_0'])
  job = [d for d in os.listdir(tmp_path / 'guided' / 'samples')][0]
  assert job.startswith('pytorch_ema_ancestral_5_cls10_seed0_')
