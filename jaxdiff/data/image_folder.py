"""A folder of PNG/JPEG images as a grain random-access source.

This is a plain grain `RandomAccessDataSource` that opens files with PIL, not a TFDS builder:
TFDS's own ImageFolder needs TensorFlow, and a builder would copy every image into a prepared
dataset before the first step. Reading the files in place works for any size and mode.

Layout: either images directly in the folder (all get label 0, unlabeled), or one subfolder
per class (labels are the sorted subfolder names; images are found recursively inside them).

Captions (read only when asked for): a `metadata.jsonl` anywhere in the tree, one JSON object a line with
`file_name` (relative to that file's folder) and `text`, as HF datasets' ImageFolder; else `<image stem>.txt`
beside the image. A metadata.jsonl column of numbers, such as SDXL's `aesthetic_score`, is read by `scores`.
"""

import json
import math
import os

import PIL.Image

from jaxdiff.errors import DataError

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')
METADATA = 'metadata.jsonl'
CAPTION_LAYOUTS = (f'a {METADATA} with one {{"file_name": ..., "text": ...}} a line (as HF datasets\' ImageFolder) '
                   'or a <image stem>.txt beside each image')


def _is_image(name):
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _visible_walk(folder):
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    yield root, files


def _images_under(folder):
  paths = []
  for root, files in _visible_walk(folder):
    paths.extend(os.path.join(root, f) for f in files if _is_image(f))
  return sorted(paths)


class ImageFolderSource:
  """Random access to the images of a folder: element i is {'image': PIL.Image, 'label': int}."""

  def __init__(self, root):
    if not os.path.isdir(root):
      raise DataError(f'image folder {root!r} does not exist or is not a folder; '
                      'set --config.data.image_dir to a folder of images.')
    self.root = root
    loose = sorted(os.path.join(root, f) for f in os.listdir(root) if _is_image(f))
    classes = {}
    for name in sorted(os.listdir(root)):
      path = os.path.join(root, name)
      if not name.startswith('.') and os.path.isdir(path):
        images = _images_under(path)
        if images:
          classes[name] = images
    if loose and classes:
      raise DataError(f'image folder {root!r} mixes loose images with class subfolders '
                      f'{sorted(classes)}; move the loose images into a class subfolder.')
    if not loose and not classes:
      raise DataError(f'image folder {root!r} has no images (accepted extensions: '
                      f'{", ".join(IMAGE_EXTENSIONS)}); add images or fix data.image_dir.')
    self.class_names = tuple(classes)
    if classes:
      self._items = [(p, label) for label, paths in enumerate(classes.values()) for p in paths]
    else:
      self._items = [(p, 0) for p in loose]

  def __len__(self):
    return len(self._items)

  @property
  def labels(self) -> list[int]:
    return [label for _, label in self._items]

  def _metadata_files(self):
    return [os.path.join(root, METADATA) for root, files in _visible_walk(self.root) if METADATA in files]

  def has_captions(self) -> bool:
    """Whether the folder has a metadata.jsonl or a caption .txt beside one of its images (one walk, no stats)."""
    texts = set()
    for root, files in _visible_walk(self.root):
      if METADATA in files:
        return True
      texts.update(os.path.join(root, f) for f in files if f.endswith('.txt'))
    return any(os.path.splitext(p)[0] + '.txt' in texts for p, _ in self._items)

  def captions(self, text_key: str = 'text') -> list[str]:
    """Each image's caption (stripped), in the order of the elements. `text_key` is the metadata.jsonl column."""
    from_metadata = {}
    for path in self._metadata_files():
      from_metadata.update(_read_metadata(path, text_key))
    captions = []
    for path, _ in self._items:
      caption = from_metadata.get(os.path.normpath(path))
      if caption is None:
        caption = _read_sidecar(path)
      if caption is None:
        if not captions and not from_metadata and not self.has_captions():
          raise DataError(f'image folder {self.root!r} has no captions; add {CAPTION_LAYOUTS}, or set '
                          'data.captions to "label" or "".')
        raise DataError(f'image {path!r} has no caption; add a line for it to a {METADATA} or write '
                        f'{os.path.splitext(os.path.basename(path))[0]}.txt beside it.')
      captions.append(caption)
    return captions

  def sizes(self) -> list[tuple[int, int]]:
    """Each image's stored (height, width), read from the file headers (no decoding)."""
    sizes = []
    for path, _ in self._items:
      try:
        with PIL.Image.open(path) as image:
          width, height = image.size
      except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f'cannot read image {path!r} ({e}); delete or replace the file.') from None
      sizes.append((height, width))
    return sizes

  def scores(self, key: str) -> list[float] | None:
    """Each image's number in metadata.jsonl column `key`, in the order of the elements; None when no row has it."""
    values = {}
    for path in self._metadata_files():
      values.update(_read_metadata_numbers(path, key))
    if not values:
      return None
    missing = [p for p, _ in self._items if os.path.normpath(p) not in values]
    if missing:
      raise DataError(f'image {missing[0]!r} has no {key!r} in a {METADATA} ({len(missing)} images lack one, '
                      f'{len(self) - len(missing)} have one); give every image a {key!r} or none.')
    return [values[os.path.normpath(p)] for p, _ in self._items]

  def __getitem__(self, index):
    path, label = self._items[index]
    try:
      with PIL.Image.open(path) as image:
        image.load()
        return {'image': image, 'label': label}
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for corrupt or truncated files.
      raise DataError(f'cannot read image {path!r} ({e}); delete or replace the file.') from None

  def __repr__(self):
    return f'ImageFolderSource({self.root!r}, {len(self)} images, {len(self.class_names)} classes)'


def _metadata_rows(path):
  """(line number, parsed object) of each non-blank line of a metadata.jsonl."""
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield number, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{path} line {number} is not JSON ({e.msg}); write one JSON object a line.') from None


def _read_metadata(path, text_key):
  """{normalised image path: caption} of one metadata.jsonl."""
  folder, captions = os.path.dirname(path), {}
  for number, row in _metadata_rows(path):
    if not (isinstance(row, dict) and isinstance(row.get('file_name'), str) and isinstance(row.get(text_key), str)):
      raise DataError(f'{path} line {number} lacks a string "file_name" or {text_key!r}; write '
                      f'{{"file_name": "<image path relative to this file>", "{text_key}": "<caption>"}}.')
    captions[os.path.normpath(os.path.join(folder, row['file_name']))] = row[text_key].strip()
  return captions


def _read_metadata_numbers(path, key):
  """{normalised image path: float} of the rows of one metadata.jsonl that have column `key`."""
  folder, values = os.path.dirname(path), {}
  for number, row in _metadata_rows(path):
    if not isinstance(row, dict) or key not in row:
      continue
    value = row[key]
    if not isinstance(row.get('file_name'), str) or isinstance(value, bool) or not isinstance(
        value, (int, float)) or not math.isfinite(value):
      raise DataError(f'{path} line {number}: {key!r} must be a finite number beside a string "file_name", got '
                      f'{value!r}; fix the line.')
    values[os.path.normpath(os.path.join(folder, row['file_name']))] = float(value)
  return values


def _read_sidecar(image_path):
  path = os.path.splitext(image_path)[0] + '.txt'
  try:
    with open(path, encoding='utf-8') as f:
      return f.read().strip()
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'cannot read caption {path!r} ({e}); fix or delete the file.') from None
