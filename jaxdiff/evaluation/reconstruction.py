"""Per-image reconstruction metrics of autoencoders, in jit-able JAX: PSNR and SSIM of NHWC float images.

Both take images in [-1, 1] by default (`data_range=2.0`); pass `data_range=1.0` for [0, 1] or 255.0 for pixels.
SSIM reproduces `skimage.metrics.structural_similarity(a, b, data_range=..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, channel_axis=-1)` of each image (Wang et al. 2004).
"""

import jax.numpy as jnp
import numpy as np

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage's choice, giving the 11-tap window of Wang et al.
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check(a, b, name):
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f'{name}: images of shapes {a.shape} and {b.shape}: both must be the same [B, H, W, C]')


def psnr(a, b, data_range: float = 2.0):
  """Peak signal-to-noise ratio [B] in dB, 10 log10(data_range^2 / MSE), the MSE over each image's H, W, C.

  Identical images give +inf (as skimage's peak_signal_noise_ratio); drop or clip them before averaging a batch.
  """
  _check(a, b, 'psnr')
  diff = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
  mse = jnp.mean(jnp.square(diff), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
  """The normalised 1-D Gaussian scipy.ndimage.gaussian_filter applies: radius int(truncate * sigma + 0.5)."""
  radius = int(truncate * sigma + 0.5)
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  return taps / taps.sum()


def _filter_valid(x, window):
  """Separable filtering of [..., H, W, C] along H and W, keeping only the positions the window fits in.

  skimage filters with reflected borders and then crops the window radius from every side before averaging, so the
  positions it averages are exactly these: no padding is needed.
  """
  n = len(window)
  h, w = x.shape[-3], x.shape[-2]
  x = sum(float(t) * x[..., i:h - n + 1 + i, :, :] for i, t in enumerate(window))
  return sum(float(t) * x[..., :, i:w - n + 1 + i, :] for i, t in enumerate(window))


def ssim(a, b, data_range: float = 2.0):
  """Mean structural similarity [B]: Gaussian-weighted (11x11, sigma 1.5) SSIM with population covariances, averaged
  over the positions at least the window radius (5 pixels) from the border and over channels. Images need H, W >= 11.
  """
  _check(a, b, 'ssim')
  window = gaussian_window()
  if min(a.shape[1:3]) < len(window):
    raise ValueError(f'ssim: images of {a.shape[1]}x{a.shape[2]} are smaller than the {len(window)}-pixel window')
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  # Moments of mean-centred images: variances are shift-invariant, and centring keeps E[x^2] - E[x]^2 from
  # cancelling catastrophically in float32 on flat regions.
  ca, cb = (jnp.mean(v, axis=(1, 2), keepdims=True) for v in (a, b))
  a0, b0 = a - ca, b - cb
  mu_a, mu_b, m_aa, m_bb, m_ab = _filter_valid(jnp.stack([a0, b0, a0 * a0, b0 * b0, a0 * b0]), window)
  var_a, var_b, cov = m_aa - mu_a * mu_a, m_bb - mu_b * mu_b, m_ab - mu_a * mu_b
  mu_a, mu_b = mu_a + ca, mu_b + cb
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return jnp.mean(s, axis=(1, 2, 3))

