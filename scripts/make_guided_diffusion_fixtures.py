"""Writes tests/fixtures/guided_diffusion/: a random tiny ADM (every option on) and its PyTorch reference outputs.

  GUIDED_DIFFUSION_PATH=/path/to/guided-diffusion python scripts/make_guided_diffusion_fixtures.py

guided-diffusion is not on PyPI, so CI checks the converter against these numbers instead of the source. The same
weights (float16 values, stored as float16) are evaluated with the new (QKVAttention, num_head_channels=16) and
legacy (QKVAttentionLegacy, num_heads=4) attention, which share every parameter shape. Output:
tiny_adm.safetensors (the state dict), tiny_adm.json (the UNetModel flags of each output) and tiny_adm_io.npz
(x NCHW, t, y and one output per flag set).
"""

import json
import os
import sys

import numpy as np
import torch

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'fixtures',
                        'guided_diffusion')
# UNetModel keyword arguments; attention_resolutions are downsample rates, as UNetModel takes them.
BASE = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
            attention_resolutions=(1, 2), dropout=0.0, channel_mult=(1, 1), num_classes=10,
            use_scale_shift_norm=True, resblock_updown=True)
FLAGS = {'new_order': dict(BASE, num_head_channels=16, use_new_attention_order=True),
         'legacy_order': dict(BASE, num_heads=4, use_new_attention_order=False)}


def import_unet(path):
  """guided-diffusion's (or improved-diffusion's) UNetModel from a local checkout."""
  sys.path.insert(0, path)
  try:
    from guided_diffusion.unet import UNetModel  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(path)
  return UNetModel


def randomize(module, seed):
  """Every parameter random, the zero-initialised output convolutions included, at a scale that keeps activations
  O(1): weights N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2), embedding tables N(0, 1).
  Values are rounded to float16, so the fixture stores them at half size and converts back exactly."""
  gen = torch.Generator().manual_seed(seed)
  tables = {f'{n}.weight' for n, m in module.named_modules() if isinstance(m, torch.nn.Embedding)}
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name in tables:
        value = noise
      elif p.ndim >= 2:
        value = noise / p[0].numel() ** 0.5
      else:
        value = 0.1 * noise + (0 if name.endswith('bias') else 1)
      p.copy_(value.half().float())
  return module


def main():
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  unet_cls = import_unet(os.environ['GUIDED_DIFFUSION_PATH'])
  models = {name: unet_cls(**flags).eval() for name, flags in FLAGS.items()}
  state = randomize(models['new_order'], seed=0).state_dict()
  models['legacy_order'].load_state_dict(state)
  gen = torch.Generator().manual_seed(1)
  x = torch.randn(3, 3, 16, 16, generator=gen)
  t = torch.tensor([0, 517, 999])
  y = torch.tensor([0, 3, 9])
  with torch.no_grad():
    outputs = {name: model(x, t, y).numpy() for name, model in models.items()}
  os.makedirs(FIXTURES, exist_ok=True)
  save_file({k: v.half() for k, v in state.items()}, os.path.join(FIXTURES, 'tiny_adm.safetensors'))
  with open(os.path.join(FIXTURES, 'tiny_adm.json'), 'w') as f:
    json.dump(FLAGS, f, indent=2)
  np.savez(os.path.join(FIXTURES, 'tiny_adm_io.npz'), x=x.numpy(), t=t.numpy(), y=y.numpy(), **outputs)
  print(f'wrote {FIXTURES}')


if __name__ == '__main__':
  main()
