"""Inception features of samples and datasets, each batch split over the local devices; reference statistics."""

import os
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdiff import data as data_lib
from jaxdiff.errors import DataError, UserError
from jaxdiff.evaluation import inception
from jaxdiff.evaluation.metrics import Statistics
from jaxdiff.progress import progress_bar
from jaxdiff.train import mesh as mesh_lib


class FeatureExtractor:
  """uint8 [0, 255] or float [-1, 1] NHWC images (1 or 3 channels) -> {'pool', 'logits'} as NumPy.

  One jitted program over a 1-D `data` mesh of every device of every process: every batch is padded to
  `batch_size` (a multiple of the device count), so it compiles once per input dtype and image size. Every process
  passes the same whole batches and gets all outputs back.
  """

  def __init__(self, variables: dict, *, batch_size: int = 100, resize_to: int | None = inception.INPUT_SIZE):
    devices = jax.devices()
    if batch_size < 1:
      raise UserError(f'batch_size must be positive, got {batch_size}.')
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    mesh = jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    self.sharding = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())
    self.variables = mesh_lib.host_to_mesh(variables, replicated, process_local=False)
    model = inception.InceptionV3(resize_to=resize_to)

    def apply(variables, images):
      x = images.astype(jnp.float32)
      if images.dtype == jnp.uint8:
        x = x / 127.5 - 1
      if x.shape[-1] == 1:  # pytorch-fid reads every image as RGB
        x = jnp.repeat(x, 3, axis=-1)
      return model.apply(variables, x)

    self._apply = jax.jit(apply, in_shardings=(replicated, self.sharding), out_shardings=self.sharding)

  def _start(self, images: np.ndarray):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) > self.batch_size:
      raise DataError(f'images must be [N <= {self.batch_size}, H, W, 1 or 3], got shape {images.shape}.')
    padded = np.zeros((self.batch_size, *images.shape[1:]), images.dtype)
    padded[:len(images)] = images
    padded = mesh_lib.host_to_mesh(padded, self.sharding, process_local=False)
    return self._apply(self.variables, padded), len(images)

  def __call__(self, batches: Iterable[np.ndarray], *, total: int | None = None,
               desc: str = 'inception') -> dict[str, np.ndarray]:
    """Outputs for all images of `batches` (each at most `batch_size`), concatenated, with a progress bar."""
    outputs = {'pool': [], 'logits': []}

    def finish(pending):
      result, n = pending
      for key, value in multihost_utils.process_allgather(result, tiled=True).items():
        outputs[key].append(np.asarray(value[:n]))
      bar.update(n)

    pending = None
    with progress_bar(total=total, desc=desc, unit='img', disable=jax.process_index() != 0) as bar:
      for images in batches:
        started = self._start(images)  # dispatched before the previous batch is fetched: they overlap
        if pending:
          finish(pending)
        pending = started
      if pending:
        finish(pending)
    if not outputs['pool']:
      raise DataError('no images to evaluate.')
    return {key: np.concatenate(value) for key, value in outputs.items()}

  def of_array(self, images: np.ndarray, desc: str = 'inception') -> dict[str, np.ndarray]:
    batches = (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size))
    return self(batches, total=len(images), desc=desc)


def load_images(path: str) -> np.ndarray:
  """`arr_0` of a samples `.npz` (jaxdiff.sampling, guided-diffusion): uint8 [N, H, W, 1 or 3]."""
  with _open_npz(path) as f:
    if 'arr_0' not in f.files:
      raise DataError(f'{path} has no images (arr_0); keys: {", ".join(f.files) or "none"}.')
    images = f['arr_0']
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8 or len(images) < 2:
    raise DataError(f'{path}: arr_0 must be uint8 [N >= 2, H, W, 1 or 3] images, got {images.dtype} '
                    f'{list(images.shape)}.')
  return images


def _open_npz(path: str):
  if not os.path.isfile(path):
    raise DataError(f'{path} not found.')
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise DataError(f'cannot read {path} as .npz ({" ".join(str(e).split())}).') from None


def load_reference(path: str, extractor: FeatureExtractor) -> Statistics:
  """Statistics from an `.npz` holding `mu` and `sigma` (pytorch-fid, guided-diffusion reference batches,
  `stats`), else computed from its `arr_0` images."""
  with _open_npz(path) as f:
    if {'mu', 'sigma'} <= set(f.files):
      mu, sigma = f['mu'], f['sigma']
      num_images = int(f['num_images']) if 'num_images' in f.files else 0
      if mu.shape != (inception.FEATURE_DIM,) or sigma.shape != (inception.FEATURE_DIM,) * 2:
        raise DataError(f'{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not the statistics of '
                        f'{inception.FEATURE_DIM}-d pool3 features.')
      return Statistics(mu.astype(np.float64), sigma.astype(np.float64), num_images)
  return Statistics.of(extractor.of_array(load_images(path), desc='reference')['pool'])


def dataset_batches(*, name: str, image_size: int, channels: int, batch_size: int, data_dir: str | None = None,
                    image_dir: str | None = None, split: str = 'train') -> tuple[Iterator[np.ndarray], int]:
  """One epoch of the training input pipeline's images (f32 [-1, 1]) and how many there are.

  The same decode, resize and crop as training sees; the epoch's last partial batch is dropped, as in training.
  """
  info = data_lib.dataset_info(name, data_dir=data_dir, image_dir=image_dir, split=split)
  num_batches = info.num_examples // batch_size
  batches = data_lib.train_batches(name=name, image_size=image_size, channels=channels, batch_size=batch_size,
                                   seed=0, data_dir=data_dir, image_dir=image_dir, split=split)
  return (next(batches)['image'] for _ in range(num_batches)), num_batches * batch_size
