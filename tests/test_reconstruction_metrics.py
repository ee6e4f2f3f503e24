"""PSNR and SSIM against NumPy's formula and scikit-image, under jit."""

import jax
import numpy as np
import pytest

from jaxdiff.evaluation import reconstruction

skimage_metrics = pytest.importorskip('skimage.metrics', reason='SSIM parity needs scikit-image (the test extra)')


def image_pairs(shape, seed):
  """(noisy, smooth, identical) pairs in [-1, 1]: SSIM far from 1, near 1 on flat regions, and exactly 1."""
  rng = np.random.default_rng(seed)
  a = rng.uniform(-1, 1, shape)
  noisy = np.clip(a + rng.normal(0, 0.3, shape), -1, 1)
  smooth = np.cumsum(np.cumsum(rng.normal(size=shape), axis=1), axis=2)
  smooth = 0.9 * smooth / np.abs(smooth).max()
  return [(a, noisy), (smooth, smooth + 0.01 * rng.normal(size=shape)), (a, a)]


@pytest.mark.parametrize('shape', [(2, 28, 28, 1), (2, 28, 28, 3), (2, 64, 64, 1), (2, 64, 64, 3)])
@pytest.mark.parametrize('data_range', [2.0, 1.0])
def test_ssim_matches_skimage(shape, data_range):
  ssim = jax.jit(reconstruction.ssim)  # data_range traced: one compile per shape
  for a, b in image_pairs(shape, seed=shape[1] + shape[3]):
    want = [skimage_metrics.structural_similarity(a[i], b[i], data_range=data_range, gaussian_weights=True,
                                                  sigma=1.5, use_sample_covariance=False, channel_axis=-1)
            for i in range(shape[0])]
    got = ssim(a.astype(np.float32), b.astype(np.float32), data_range=data_range)
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_gaussian_window_is_skimage_filter():
  """The 11 taps are those scipy's gaussian_filter (what skimage calls) applies with sigma 1.5, truncate 3.5."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  impulse = np.zeros(21)
  impulse[10] = 1.0
  np.testing.assert_allclose(reconstruction.gaussian_window(),
                             ndimage.gaussian_filter1d(impulse, 1.5, truncate=3.5)[5:16], atol=1e-15)


def test_ssim_rejects_small_or_mismatched_images():
  with pytest.raises(ValueError, match='11-pixel window'):
    reconstruction.ssim(np.zeros((1, 10, 12, 1)), np.zeros((1, 10, 12, 1)))
  with pytest.raises(ValueError, match='same'):
    reconstruction.ssim(np.zeros((1, 16, 16, 1)), np.zeros((1, 16, 16, 3)))


def test_psnr_matches_numpy_and_skimage():
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (3, 28, 28, 3))
  b = np.clip(a + rng.normal(0, 0.1, a.shape), -1, 1)
  b[2] = a[2]  # identical images: +inf, as skimage
  got = np.asarray(jax.jit(reconstruction.psnr)(a.astype(np.float32), b.astype(np.float32)))
  with np.errstate(divide='ignore'):
    want = 10 * np.log10(2.0 ** 2 / np.mean((a - b) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(got[:2], want[:2], rtol=0, atol=1e-5)
  assert got[2] == want[2] == np.inf
  np.testing.assert_allclose(
      got[0], skimage_metrics.peak_signal_noise_ratio(a[0], b[0], data_range=2.0), rtol=0, atol=1e-4)
  # [0, 1] images with data_range=1 give the same dB as the [-1, 1] ones with data_range=2.
  np.testing.assert_allclose(reconstruction.psnr((a[:2] + 1) / 2, (b[:2] + 1) / 2, data_range=1.0), got[:2], atol=1e-4)
