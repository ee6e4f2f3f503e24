"""Writes tests/fixtures/inception/reference.npz: pytorch-fid's own FID Inception features for a few images.

The weights are `jaxdiff.evaluation.inception.random_state_dict(SEED)` (the real ones are 95 MB), handed to
pytorch-fid in place of its download, so the fixture holds only the seed, the images and pytorch-fid's outputs
(pool3 features through its resize-to-299 path, and the bias-free logits). tests/test_evaluation.py checks the
Flax network against it without needing torch.

  pip install torch==2.13.0 && pip install --no-deps torchvision pytorch-fid
  python scripts/make_inception_fixtures.py
"""

import importlib
import importlib.metadata
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff.evaluation import inception  # pylint: disable=g-import-not-at-top,wrong-import-position

SEED = 0
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'fixtures', 'inception',
                   'reference.npz')


def import_pytorch_fid():
  """pytorch_fid.inception, also where the torchvision wheel was built for another torch.

  Such a wheel fails while registering its compiled operators (nms, ...); the Inception modules pytorch-fid
  builds on are plain Python and do not use them, so the registration is skipped.
  """
  try:
    return importlib.import_module('pytorch_fid.inception')
  except RuntimeError as e:
    print(f'torchvision does not match torch ({e}); importing it without its compiled operators')
  for name in [n for n in sys.modules if n.startswith(('torchvision', 'pytorch_fid'))]:
    del sys.modules[name]
  sys.modules['torchvision._meta_registrations'] = types.ModuleType('torchvision._meta_registrations')
  return importlib.import_module('pytorch_fid.inception')


def main():
  import torch  # pylint: disable=g-import-not-at-top
  pytorch_fid = import_pytorch_fid()
  state_dict = inception.random_state_dict(SEED)
  # pytorch-fid loads its weights strictly, so this also checks that jaxdiff expects exactly its keys.
  pytorch_fid.load_state_dict_from_url = lambda *a, **k: {k: torch.from_numpy(v) for k, v in state_dict.items()}
  model = pytorch_fid.InceptionV3([pytorch_fid.InceptionV3.BLOCK_INDEX_BY_DIM[inception.FEATURE_DIM]]).eval()
  rng = np.random.default_rng(SEED)
  # Smooth random images (upsampled noise) look more like photos to the network than white noise.
  coarse = rng.integers(0, 256, (3, 8, 8, 3)).astype(np.float32)
  images = np.clip(np.kron(coarse, np.ones((1, 4, 4, 1))) + rng.normal(0, 12, (3, 32, 32, 3)), 0, 255)
  images = images.astype(np.uint8)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # pytorch-fid's ToTensor range
    pool = model(x)[0].flatten(1)
    logits = pool @ torch.from_numpy(state_dict['fc.weight']).T
  np.savez_compressed(OUT, seed=SEED, images=images, pool=pool.numpy(), logits=logits.numpy(),
                      versions=f'torch {torch.__version__}, pytorch-fid {importlib.metadata.version("pytorch-fid")}')
  print(f'wrote {OUT} ({os.path.getsize(OUT)} bytes)')


if __name__ == '__main__':
  main()
