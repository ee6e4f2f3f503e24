"""benchmarks/sdxl_demo.py: its measurements on synthetic digits (fast), and the whole demo on the smoke configs."""

import importlib.util
import os

import numpy as np
import pytest

from helpers import REPO


def _demo():
  spec = importlib.util.spec_from_file_location('sdxl_demo', os.path.join(REPO, 'benchmarks', 'sdxl_demo.py'))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  return demo


def test_centre_of_mass_crop_window_and_held_out_digits():
  demo = _demo()
  dots = np.zeros((3, 32, 32, 1), np.uint8)
  dots[0, 15, 15] = dots[1, 3, 30] = 255
  dots[2, 0, 0] = dots[2, 31, 31] = 255  # two equal dots: their midpoint, the centre
  np.testing.assert_allclose(demo.centre_of_mass(dots), [[-0.5, -0.5], [-12.5, 14.5], [0, 0]])
  assert np.isnan(demo.centre_of_mass(np.zeros((1, 4, 6)))).all()
  wide = np.zeros((1, 24, 48), np.uint8)
  wide[0, :, 40:] = 7  # columns 40..47: centre 43.5, the image's 23.5
  np.testing.assert_allclose(demo.centre_of_mass(wide), [[0, 20]])

  # A digit symmetric about its box's centre: cropping the padded canvas at left L moves its centre to -L, and the
  # judge's window at that crop is the digit again, cut where the crop cut it.
  digit = np.zeros((1, 28, 28), np.uint8)
  digit[0, 6:22, 4:24] = 200  # canvas columns 6..25
  canvas = demo.padded(digit)
  assert canvas.shape == (1, 32, 44)
  for left in (0, 4, 8, 12):
    crop = canvas[:, :, left:left + 32]
    kept = (max(6, left) + 25) / 2 - left  # past left = 6 the crop cuts into the digit
    np.testing.assert_allclose(demo.centre_of_mass(crop), [[0, kept - 15.5]], atol=1e-12)
    assert left > 6 or kept - 15.5 == -left
    window = demo.crop_window(crop[..., None], left)[..., 0]
    expected = digit.copy()
    expected[:, :, :max(0, left - 2)] = 0  # the crop cut off the canvas columns < left (the digit's < left - 2)
    np.testing.assert_array_equal(window, expected)
  tall = demo.aspect_canvas(digit[0], 'tall')
  assert tall.shape == (64, 32) and demo.centre_of_mass(tall[None]).tolist() == [[0, 0]]
  back = demo.bucket_window(np.stack([demo.resized(tall, (48, 24))]))[0, ..., 0].astype(float)
  assert np.abs(back - digit[0]).mean() < 10 and np.abs(demo.centre_of_mass(back[None])).max() < 0.1

  labels = np.repeat(np.arange(10), 500)  # the bundled digits are sorted by class
  held = demo.held_out(labels)
  assert held.sum() == 500 and (np.bincount(labels[held]) == 50).all() and held[450:500].all() and not held[:450].any()


@pytest.mark.slow
def test_sdxl_demo_smoke(tmp_path):
  """The whole demo on the smoke configs: folders, autoencoder, crop model, multi-aspect fine-tuning, sampling of
  every crop setting and bucket, the judge and the pictures."""
  crop_rows, bucket_rows, times = _demo().main(['--smoke', '--num-samples', '20', '--crops', '0,12',
                                                '--workdir', str(tmp_path)])
  assert [r['left'] for r in crop_rows] == [0, 12] and all(r['n'] == 20 for r in crop_rows)
  for r in crop_rows + bucket_rows:
    assert 0 <= r['accuracy'] <= 1 and np.isfinite(r['x']).all() and np.isfinite(r['y']).all()
  # The real digits cropped as in training: the crop moves them left by `left` (MNIST centres the mass half a pixel
  # right of the canvas centre), and the judge reads nearly all of them.
  assert abs(crop_rows[0]['real_x'][0] - 0.5) < 0.1 and crop_rows[1]['real_x'][0] < -9
  assert crop_rows[0]['real_accuracy'] > 0.95 and all(r['real_accuracy'] > 0.95 for r in bucket_rows)
  assert [r['shape'] for r in bucket_rows] == [(24, 48), (48, 24)] and all(r['n'] == 20 for r in bucket_rows)
  assert {'train autoencoder', 'train crop model', 'fine-tune on aspect buckets', 'sample crops',
          'sample buckets'} <= set(times)
  for name in ('sdxl_crops.png', 'sdxl_buckets.png'):
    assert os.path.getsize(tmp_path / name) > 0
