"""A folder of PNG/JPEG images as a grain random-access source.

This is a plain grain `RandomAccessDataSource` that opens files with PIL, not a TFDS builder:
TFDS's own ImageFolder needs TensorFlow, and a builder would copy every image into a prepared
dataset before the first step. Reading the files in place works for any size and mode.

Layout: either images directly in the folder (all get label 0, unlabeled), or one subfolder
per class (labels are the sorted subfolder names; images are found recursively inside them).
"""

import os

import PIL.Image

from jaxdiff.errors import DataError

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')


def _is_image(name):
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _images_under(folder):
  paths = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
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
