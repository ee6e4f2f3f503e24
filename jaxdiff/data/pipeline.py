"""Training input pipeline: a TFDS dataset or an image folder, read with grain.

Batches are a pure function of (seed, step): grain's MapDataset gives random access by index, so
the iterator starts at any step without replaying earlier ones and flips are seeded by index.

Captions for text-to-image training come from the data's own text (`captions='text'`: a TFDS Text feature, or an
image folder's metadata.jsonl / .txt files) or from the class labels (`captions='label'`: a template filled with the
class name); they reach the batch as `tokens`, tokenised on the host by the caller's tokenizer.

Every batch also records SDXL's micro-conditions of its images: the stored size, where the crop fitting each image to
the batch's shape was taken, and that shape; with aspect buckets (buckets.py) the shape changes between batches.
"""

import dataclasses
import fcntl
import io
import logging
import math
import os
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from jaxdiff.data import builders
from jaxdiff.data import buckets as buckets_lib
from jaxdiff.data.image_folder import CAPTION_LAYOUTS, ImageFolderSource
from jaxdiff.errors import ConfigError, DataError

IMAGE_FOLDER = 'image_folder'
# Small in-memory datasets: prepared on first use, decoded once and kept as arrays.
BUNDLED = (builders.MlxtendMnist.name, builders.SklearnDigits.name)
_CACHE_MAX_BYTES = 256 * 2**20
# Where captions come from: none, the data's own text, or the class labels through a template.
CAPTION_SOURCES = ('', 'text', 'label')
CROPS = ('center', 'random')  # where the crop fitting an image to its target shape is taken
AESTHETIC = 'aesthetic_score'  # an image folder's metadata.jsonl column (or a TFDS feature) read into batches
Tokenizer = Callable[[list[str]], np.ndarray]  # texts -> int [N, max_length]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_examples: int
  num_classes: int  # 0 when unlabeled
  class_names: tuple[str, ...]
  has_captions: bool = False  # the data carry their own captions: captions='text' can read them


@dataclasses.dataclass(frozen=True)
class _Source:
  data: Any  # Random access: len() and [i] -> dict of features.
  image_key: str
  label_key: str | None
  info: DatasetInfo
  text_keys: tuple[str, ...] = ()  # TFDS Text features
  score_key: str | None = None  # a TFDS feature holding each example's aesthetic score
  image_shape: tuple[int, int] | None = None  # (h, w) when every image has it (a TFDS feature of fixed shape)
  folder: ImageFolderSource | None = None


def _tfds_source(name, data_dir, split, *, skip_images=False):
  where = data_dir or tfds.core.constants.DATA_DIR
  bundled = name in BUNDLED
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record' if bundled else None)
  except tfds.core.DatasetNotFoundError:
    raise DataError(f'unknown dataset {name!r}: neither in the TFDS catalogue nor one of '
                    f'{", ".join(BUNDLED + (IMAGE_FOLDER,))}; fix --config.data.name.') from None
  except (ValueError, AssertionError) as e:  # Malformed name, unknown config or version.
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f'bad dataset name {name!r} ({reason}); use NAME[/CONFIG][:VERSION] '
                    'from the TFDS catalogue in --config.data.name.') from None
  if not builder.is_prepared():
    if not bundled:
      raise DataError(f'dataset {name!r} is not prepared in {where}; prepare it with '
                      f'`tfds build {name} --data_dir {where} --file_format array_record` '
                      'or point --config.data.data_dir at a folder where it is.')
    builder = _prepare_once(name, where)
  features = dict(builder.info.features.items())
  keys = builder.info.supervised_keys
  if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    image_key, label_key = keys
  else:
    image_key, label_key = 'image', None
  if not isinstance(features.get(image_key), tfds.features.Image):
    raise DataError(f'dataset {name!r} has no image feature named {image_key!r} '
                    f'(features: {sorted(features)}); choose an image dataset.')
  # Reading only captions or labels: the images stay undecoded bytes.
  decoders = {image_key: tfds.decode.SkipDecoding()} if skip_images else None
  try:
    data = builder.as_data_source(split=split, decoders=decoders)
  except NotImplementedError:
    raise DataError(f'dataset {name!r} in {where} is stored as {builder.info.file_format.value}, '
                    'which has no random access; rebuild it with '
                    f'`tfds build {name} --data_dir {where} --file_format array_record`.') from None
  except (ValueError, KeyError) as e:
    reason = ' '.join(str(e).split()).rstrip('.')  # TFDS messages can span lines.
    raise DataError(f'cannot read split {split!r} of dataset {name!r}: {reason}; fix '
                    '--config.data.split (slices such as "train[:90%]" work).') from None
  label = features.get(label_key)
  if not isinstance(label, tfds.features.ClassLabel):
    label_key, class_names = None, ()
  else:
    class_names = tuple(label.names)
  text_keys = tuple(sorted(k for k, f in features.items() if isinstance(f, tfds.features.Text)))
  info = DatasetInfo(len(data), len(class_names), class_names, bool(text_keys))
  shape = features[image_key].shape[:2]
  image_shape = tuple(shape) if all(isinstance(s, int) for s in shape) else None
  return _Source(data, image_key, label_key, info, text_keys, AESTHETIC if AESTHETIC in features else None,
                 image_shape)


def _prepare_once(name, data_dir):
  """Prepares a bundled dataset under a file lock: of several processes (or jobs) sharing data_dir, the first
  prepares it and the others wait, then read what it wrote."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f'.{name}.prepare.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
      if not builder.is_prepared():
        builder.download_and_prepare()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder


def _open(name, data_dir, image_dir, split, *, skip_images=False):
  if name != IMAGE_FOLDER:
    return _tfds_source(name, data_dir, split, skip_images=skip_images)
  if not image_dir:
    raise DataError(f'dataset {IMAGE_FOLDER!r} needs a folder of images; '
                    'set --config.data.image_dir.')
  data = ImageFolderSource(image_dir)
  names = data.class_names
  info = DatasetInfo(len(data), len(names), names, data.has_captions())
  return _Source(data, 'image', 'label' if names else None, info, folder=data)


def dataset_info(name: str, *, data_dir: str | None = None, image_dir: str | None = None,
                 split: str = 'train') -> DatasetInfo:
  """Size, classes and whether the data carry captions (preparing a bundled one on first use)."""
  return _open(name, data_dir, image_dir, split).info


@dataclasses.dataclass(frozen=True)
class _Captions:
  """Where an example's caption is: a text feature of the example ('text'), or its class's caption ('label')."""
  text_key: str | None = None
  class_captions: tuple[str, ...] = ()


class _WithColumns:
  """An image folder's elements with more values each, e.g. {'caption': captions}."""

  def __init__(self, data, columns: dict[str, list]):
    self.data, self.columns = data, columns

  def __len__(self):
    return len(self.data)

  def __getitem__(self, index):
    return {**self.data[index], **{key: values[index] for key, values in self.columns.items()}}


def _check_captions(captions):
  if captions not in CAPTION_SOURCES:
    raise DataError(f'captions={captions!r} is not one of {CAPTION_SOURCES}; fix data.captions.')


def is_caption_template(template) -> bool:
  """Whether `template.format(class_name)` puts the class name in: a string with one {} (and no other field)."""
  try:
    return isinstance(template, str) and template.format('\0') != template.format('\1')
  except (IndexError, KeyError, ValueError):
    return False


def _check_template(template):
  if not is_caption_template(template):
    raise DataError(f'caption_template={template!r} must hold one {{}} for the class name, e.g. '
                    '"a photo of a {}"; fix data.caption_template.')


def _class_captions(source, name, caption_template, class_names):
  _check_template(caption_template)
  if not source.label_key:
    raise DataError(f'dataset {name!r} has no class labels to caption; use data.captions="text" or a labelled '
                    'dataset.')
  num_classes = source.info.num_classes
  names = tuple(class_names) or source.info.class_names
  if not all(isinstance(n, str) for n in names):
    raise DataError(f'class_names={names!r} must be strings; fix data.class_names.')
  if len(names) < num_classes:
    raise DataError(f'labels {len(names)}..{num_classes - 1} of dataset {name!r} are out of range of the '
                    f'{len(names)} data.class_names; give one name per class ({num_classes}).')
  if len(names) > num_classes:
    raise DataError(f'data.class_names has {len(names)} names but dataset {name!r} has {num_classes} classes; '
                    'give one name per class.')
  return tuple(caption_template.format(n) for n in names)


def _open_captions(name, data_dir, image_dir, split, *, captions, text_feature, caption_template, class_names,
                   skip_images=False):
  """The source (an image folder's elements gain 'caption') and where its captions are."""
  _check_captions(captions)
  source = _open(name, data_dir, image_dir, split, skip_images=skip_images)
  if captions == 'label':
    return source, _Captions(class_captions=_class_captions(source, name, caption_template, class_names))
  if captions != 'text':
    return source, _Captions()
  if name == IMAGE_FOLDER:
    data = _WithColumns(source.data, {'caption': source.folder.captions(text_feature or 'text')})
    return dataclasses.replace(source, data=data), _Captions(text_key='caption')
  if text_feature:
    if text_feature not in source.text_keys:
      raise DataError(f'dataset {name!r} has no text feature {text_feature!r} (text features: '
                      f'{list(source.text_keys)}); fix data.text_feature.')
    return source, _Captions(text_key=text_feature)
  if not source.text_keys:
    raise DataError(f'dataset {name!r} has no text feature (tfds.features.Text) to read captions from; use '
                    f'data.captions="label", a dataset with captions, or an image folder with {CAPTION_LAYOUTS}.')
  if len(source.text_keys) > 1:
    raise DataError(f'dataset {name!r} has several text features {list(source.text_keys)}; choose one with '
                    'data.text_feature.')
  return source, _Captions(text_key=source.text_keys[0])


def _as_str(value):
  """A caption as str: TFDS Text features decode to bytes."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def captions_of(*, name: str, captions: str = 'text', data_dir: str | None = None, image_dir: str | None = None,
                split: str = 'train', text_feature: str = '', caption_template: str = '{}',
                class_names: tuple[str, ...] = ()) -> list[str]:
  """Every example's caption in a split, in the dataset's stored (unshuffled) order; images are not decoded."""
  if not captions:
    raise DataError('captions_of needs captions="text" or "label"; set data.captions.')
  source, where = _open_captions(name, data_dir, image_dir, split, captions=captions, text_feature=text_feature,
                                 caption_template=caption_template, class_names=class_names, skip_images=True)
  if name == IMAGE_FOLDER:
    if where.text_key:
      return list(source.data.columns['caption'])
    return [where.class_captions[label] for label in source.folder.labels]
  key = where.text_key or source.label_key
  values = (source.data[i][key] for i in range(len(source.data)))
  if where.text_key:
    return [_as_str(v) for v in values]
  return [where.class_captions[int(v)] for v in values]


def class_captions(*, name: str, data_dir: str | None = None, image_dir: str | None = None, split: str = 'train',
                   caption_template: str = '{}', class_names: tuple[str, ...] = ()) -> tuple[str, ...]:
  """The caption of each class, in label order (what captions='label' gives its examples): prompts for sampling."""
  source = _open(name, data_dir, image_dir, split, skip_images=True)
  return _class_captions(source, name, caption_template, class_names)


def caption_options(data_config, tokenize: Tokenizer | None = None) -> dict:
  """The caption keyword arguments of train_batches (and, without tokenize, of captions_of) from `config.data`."""
  options = dict(captions=data_config.captions, text_feature=data_config.text_feature,
                 caption_template=data_config.caption_template, class_names=tuple(data_config.class_names))
  return options if tokenize is None else {**options, 'tokenize': tokenize}


def _tokenize(tokenize, texts):
  tokens = np.asarray(tokenize(list(texts)))
  if tokens.ndim != 2 or tokens.shape[0] != len(texts) or not np.issubdtype(tokens.dtype, np.integer):
    raise DataError(f'the tokenizer returned {tokens.dtype} {tokens.shape} for {len(texts)} texts; it must return '
                    'integer ids [texts, max_length].')
  return tokens.astype(np.int32)


def _fit(image, height, width, channels, rng=None):
  """Any PIL image or HWC uint8 array -> an element: 'image' uint8 [height, width, channels] and where it came from.

  The image is resized to cover (height, width) (scale = max(height / h, width / w)) and the excess cropped at the
  centre, or, given rng, at a random whole pixel of the resized image (SDXL's random crop), in one PIL resize of the
  cropped box. Also returns 'original_size' (h, w) as stored, 'crop' (top, left) and 'resized' (h, w) in the pixels
  of the resized image (SDXL/SGM's crop convention), as floats until the batch rounds them.
  """
  if isinstance(image, np.ndarray):
    image = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  image = image.convert('L' if channels == 1 else 'RGB')
  w, h = image.size
  # The box in stored pixels. The side that sets the scale is taken whole; products of integers are exact, so a
  # square target's box is exactly the central min(h, w) square (bitwise the batches of before buckets).
  if height * w >= width * h:
    scale, box_h, box_w = height / h, h, width * h / height
  else:
    scale, box_h, box_w = width / w, height * w / width, w
  if rng is None:
    top, left = (h - box_h) / 2, (w - box_w) / 2
    crop = (top * scale, left * scale)
  else:
    crop = tuple(float(rng.integers(max(0, math.floor(excess + 1e-6)) + 1))
                 for excess in (h * scale - height, w * scale - width))
    top, left = min(crop[0] / scale, h - box_h), min(crop[1] / scale, w - box_w)
  if (w, h) != (width, height):
    image = image.resize((width, height), PIL.Image.Resampling.BICUBIC, box=(left, top, left + box_w, top + box_h))
  return {'image': np.asarray(image, np.uint8).reshape(height, width, channels),
          'original_size': np.array([h, w], np.int32), 'crop': np.array(crop), 'resized': np.array([h, w]) * scale}


class _Cached:
  """All examples decoded and resized once: a few ms per batch instead of a PNG decode each."""

  def __init__(self, examples):
    self.columns = {key: [e[key] for e in examples] if isinstance(value, str) else np.stack([e[key] for e in examples])
                    for key, value in examples[0].items()}

  def __len__(self):
    return len(self.columns['label'])

  def __getitem__(self, index):
    return {key: values[index] for key, values in self.columns.items()}


def _zoom_crop(image, rng, min_crop_frac):
  """(image, zoomed side, top, left): random_resized_crop and where it cropped."""
  size, channels = image.shape[0], image.shape[-1]
  side = int(rng.integers(size, math.ceil(size / min_crop_frac) + 1))
  pil = PIL.Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = np.asarray(pil.resize((side, side), PIL.Image.Resampling.BICUBIC), np.uint8).reshape(side, side, channels)
  top, left = (int(rng.integers(side - size + 1)) for _ in range(2))
  return resized[top:top + size, left:left + size], side, top, left


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, min_crop_frac: float = 0.8) -> np.ndarray:
  """uint8 [S, S, C] -> [S, S, C]: resized (bicubic) to a random side in [S, ceil(S / min_crop_frac)], then a random
  S x S crop, as guided-diffusion's random_crop_arr does for the shorter side."""
  return _zoom_crop(image, rng, min_crop_frac)[0]


def _random_crop(example, rng):
  """random_resized_crop of an element; its recorded crop moves into the zoomed image's pixels."""
  image, side, top, left = _zoom_crop(example['image'], rng, 0.8)
  zoom = side / example['image'].shape[0]
  return {**example, 'image': image, 'crop': example['crop'] * zoom + (top, left), 'resized': example['resized'] * zoom}


def _flip(example, rng):
  """A horizontal flip half the time. SGM's SDXL recipe does not flip; when asked to, we mirror the recorded crop as
  diffusers' SDXL script does: the flipped pixels are the crop of the mirrored resized image at left' = W - left - w,
  so the crop condition stays true of what the model sees."""
  if rng.random() >= 0.5:
    return example
  image = example['image']
  top, left = example['crop']
  return {**example, 'image': image[:, ::-1], 'crop': np.array([top, example['resized'][1] - left - image.shape[1]])}


def _check_int(name, value, low, high=None):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low or (
      high is not None and value > high):
    bound = f'in [{low}, {high}]' if high is not None else f'>= {low}'
    raise DataError(f'{name} must be an integer {bound}, got {value!r}; fix the data config.')


def _check_buckets(buckets):
  if not isinstance(buckets, (tuple, list)) or not buckets or not all(
      isinstance(b, (tuple, list)) and len(b) == 2 and all(
          isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in b) for b in buckets):
    raise DataError(f'buckets={buckets!r} must be a non-empty list of (height, width) pairs of positive integers; '
                    'use data.multi_aspect / data.bucket_multiple.')


def _stored_sizes(source, name, data_dir, split):
  """Each example's stored (h, w): from an image folder's file headers, a TFDS feature's fixed shape, or the header
  of each encoded TFDS image (read once, not decoded)."""
  if source.folder is not None:
    return source.folder.sizes()
  if source.image_shape is not None:
    return [source.image_shape] * source.info.num_examples
  encoded = _tfds_source(name, data_dir, split, skip_images=True)
  sizes = []
  for i in range(len(encoded.data)):
    with PIL.Image.open(io.BytesIO(encoded.data[i][encoded.image_key])) as image:
      sizes.append(image.size[::-1])
  return sizes


def train_batches(*, name: str, image_size: int, channels: int, batch_size: int, seed: int,
                  data_dir: str | None = None, image_dir: str | None = None, split: str = 'train',
                  random_flip: bool = False, random_crop: bool = False, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, worker_threads: int = 2, captions: str = '', text_feature: str = '',
                  caption_template: str = '{}', class_names: tuple[str, ...] = (),
                  tokenize: Tokenizer | None = None, crop: str = 'center',
                  buckets: Sequence[tuple[int, int]] | None = None) -> Iterator[dict]:
  """Endless batches {'image': f32[B, H, W, C] in [-1, 1], 'label': i32[B]} and SDXL's micro-conditions, from
  start_step on.

  Every batch holds 'original_size' i32[B, 2] (each image's stored (h, w)), 'crops_coords_top_left' i32[B, 2] (the
  (top, left) of the crop taken, in the pixels of the image resized to cover the target) and 'target_size' i32[B, 2]
  (the batch's (H, W)), and 'aesthetic_score' f32[B] when the data have one (an image folder's metadata.jsonl column
  or a TFDS feature 'aesthetic_score'). Images are resized to cover the target and cropped at the centre, or at a
  random place with crop='random'. The target is (image_size, image_size), or with `buckets` ((h, w) pairs, e.g.
  buckets.sdxl_buckets) the bucket nearest each image's aspect ratio: every global batch is one bucket's.

  With captions ('text': the data's own, from text_feature or the only Text feature, or an image folder's
  metadata.jsonl column text_feature or 'text' / .txt files; 'label': caption_template filled with class_names[label],
  the dataset's class names when empty) batches also hold 'tokens': i32[B, L], `tokenize` of the captions.

  Epochs are reshuffled and drop their remainder; batch k depends only on (seed, k). batch_size is
  this process's share: global batch k is the concatenation over processes of their batch k. random_crop is
  guided-diffusion's classifier augmentation (`random_crop_arr`): the image is resized so its side is a random
  size in [S, ceil(S / 0.8)] and cropped back to S at a random place (square targets only).
  """
  _check_int('image_size', image_size, 1)
  if channels not in (1, 3):
    raise DataError(f'channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.')
  _check_int('batch_size', batch_size, 1)
  _check_int('seed', seed, 0, 2**32 - 1)
  _check_int('start_step', start_step, 0)
  _check_int('process_count', process_count, 1)
  _check_int('process_index', process_index, 0, process_count - 1)
  _check_int('worker_threads', worker_threads, 0)
  if crop not in CROPS:
    raise DataError(f'crop={crop!r} is not one of {CROPS}; fix data.crop.')
  if buckets is not None:
    _check_buckets(buckets)
    if random_crop:
      raise DataError('random_crop (guided-diffusion\'s square zoom) does not apply to aspect buckets; set '
                      'data.random_crop=False (data.crop="random" is SDXL\'s crop) or data.multi_aspect=False.')
  _check_captions(captions)
  if captions and tokenize is None:
    raise ConfigError(f'data.captions={captions!r} trains on text: it needs a text encoder and its tokenizer '
                      '(set config.text_encoder.kind and .tokenizer), or set data.captions="".')
  source, where = _open_captions(name, data_dir, image_dir, split, captions=captions, text_feature=text_feature,
                                 caption_template=caption_template, class_names=class_names)
  scores = source.folder.scores(AESTHETIC) if source.folder is not None else None
  if scores is not None:  # An image folder's scores join its elements, beside any captions.
    data = source.data if isinstance(source.data, _WithColumns) else _WithColumns(source.data, {})
    data = _WithColumns(data.data, {**data.columns, AESTHETIC: scores})
    source = dataclasses.replace(source, data=data, score_key=AESTHETIC)
  score_key = source.score_key
  # Tokens on the host: a class's are looked up, the data's own are tokenised a batch (one call) at a time.
  class_tokens = _tokenize(tokenize, where.class_captions) if where.class_captions else None
  size = len(source.data)
  global_batch = batch_size * process_count
  if size < global_batch:
    raise DataError(f'dataset {name!r} has {size} examples, fewer than one global batch of '
                    f'{global_batch}; lower batch_size.')

  def preprocess(example, height=image_size, width=image_size, rng=None):
    out = _fit(example[source.image_key], height, width, channels, rng)
    out['label'] = np.int32(example[source.label_key] if source.label_key else 0)
    if where.text_key:
      out['caption'] = _as_str(example[where.text_key])
    if score_key:
      out[AESTHETIC] = np.float32(example[score_key])
    return out

  if buckets is not None:
    ds = _bucket_elements(source, preprocess, buckets=buckets, sizes=_stored_sizes(source, name, data_dir, split),
                          seed=seed, batch_size=batch_size, process_index=process_index,
                          process_count=process_count, start_step=start_step, crop=crop, random_flip=random_flip)
    ds = ds.batch(batch_size, drop_remainder=True)
  else:
    cached = name in BUNDLED and size * image_size**2 * channels <= _CACHE_MAX_BYTES
    if cached:
      # Bundled digits are square: a square target leaves nothing to crop, so crop='random' changes nothing.
      ds = grain.MapDataset.source(_Cached([preprocess(e) for e in source.data]))
      ds = ds.shuffle(seed=int(seed))
      # Batches of decoded arrays cost microseconds: reader threads would only take CPU from the train step (19%
      # fewer steps/s for the main MNIST job on 2 cores).
      worker_threads = 0
    else:
      ds = grain.MapDataset.source(source.data).shuffle(seed=int(seed))
      if crop == 'random':
        ds = ds.random_map(lambda example, rng: preprocess(example, rng=rng), seed=int(seed) + 2)
      else:
        ds = ds.map(preprocess)
    # rng is seeded by the element's index in the endless stream, hence by (seed, step).
    if random_crop:
      ds = ds.random_map(_random_crop, seed=int(seed) + 1)
    if random_flip:
      ds = ds.random_map(_flip, seed=int(seed))
    ds = ds.batch(batch_size, drop_remainder=True)
    # Per epoch keep whole global batches, then take sub-batch p of each: disjoint shares.
    ds = ds[:size // global_batch * process_count][process_index::process_count]
    ds = ds.repeat()[start_step:]

  def finish(b):
    image = b['image']
    out = {'image': image.astype(np.float32) / 127.5 - 1.0, 'label': b['label'],
           'original_size': b['original_size'],
           'crops_coords_top_left': np.maximum(np.floor(b['crop'] + 0.5), 0).astype(np.int32),
           'target_size': np.tile(np.array(image.shape[1:3], np.int32), (len(image), 1))}
    if score_key:
      out[AESTHETIC] = b[AESTHETIC].astype(np.float32)
    if where.text_key:
      out['tokens'] = _tokenize(tokenize, [str(c) for c in b['caption']])
    elif class_tokens is not None:
      out['tokens'] = class_tokens[b['label']]
    return out

  ds = ds.map(finish)
  options = grain.ReadOptions(num_threads=worker_threads, prefetch_buffer_size=2 * worker_threads)
  return iter(ds.to_iter_dataset(options))


def _bucket_elements(source, preprocess, *, buckets, sizes, seed, batch_size, process_index, process_count,
                     start_step, crop, random_flip):
  """This process's elements from start_step on, each fitted to its global batch's bucket.

  Element j of the process is example p * B + j % B of global batch j // B (p = process_index, B = batch_size); its
  random crop and flip draw from a generator seeded by (seed, its index in the global stream), so shares of any
  process count concatenate to the same global batches.
  """
  global_batch = batch_size * process_count
  schedule = buckets_lib.BucketSchedule(buckets_lib.nearest_buckets(sizes, buckets), buckets, global_batch, seed)
  logging.info('Aspect buckets (h x w: global batches per epoch): %s.',
               ', '.join(f'{h}x{w}: {n}' for (h, w), n in schedule.counts().items()))

  def element(j):
    step, i = divmod(int(j), batch_size)
    bucket, examples = schedule.batch(step)
    position = process_index * batch_size + i
    rng = np.random.default_rng([seed, step * global_batch + position, 1])  # 0: the bucket schedule
    height, width = schedule.buckets[bucket]
    out = preprocess(source.data[int(examples[position])], height, width, rng if crop == 'random' else None)
    return _flip(out, rng) if random_flip else out

  first = start_step * batch_size
  return grain.MapDataset.range(first, first + 2**40 * batch_size).map(element)  # endless in practice
