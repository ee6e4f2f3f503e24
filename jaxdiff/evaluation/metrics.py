"""FID and Inception Score from Inception outputs, in float64 NumPy/SciPy as the reference implementations."""

import dataclasses
import os

import numpy as np
import scipy.linalg
import scipy.special

from jaxdiff.errors import UserError


@dataclasses.dataclass(frozen=True)
class Statistics:
  """Mean and covariance of pool3 features: what FID compares."""
  mu: np.ndarray  # [D]
  sigma: np.ndarray  # [D, D]
  num_images: int = 0  # 0 when unknown (statistics computed elsewhere)

  @classmethod
  def of(cls, features: np.ndarray) -> 'Statistics':
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
      raise UserError(f'statistics need at least 2 feature vectors [N, D], got shape {features.shape}.')
    return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features))

  def save(self, path: str) -> str:
    """Writes `mu`, `sigma` (the keys pytorch-fid and guided-diffusion read) and `num_images`, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez(tmp, mu=self.mu, sigma=self.sigma, num_images=self.num_images)
    os.replace(tmp, path)
    return path


def frechet_distance(a: Statistics, b: Statistics, eps: float = 1e-6) -> float:
  """||mu_a - mu_b||^2 + Tr(sigma_a + sigma_b - 2 sqrt(sigma_a sigma_b)), as pytorch-fid computes it.

  When the product's square root is not finite (a near-singular covariance), eps is added to both
  diagonals; a small imaginary part left by `sqrtm` is rounding and is dropped.
  """
  mu_a, mu_b = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
  sigma_a, sigma_b = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
  if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
    raise UserError(f'statistics do not match: mu {mu_a.shape} vs {mu_b.shape}, sigma {sigma_a.shape} vs '
                    f'{sigma_b.shape}; compute both with the same network (2048-d pool3 features).')
  covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(sigma_a)) * eps
    covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'sqrtm of the covariance product has an imaginary part of '
                       f'{np.abs(covmean.imag).max():.3g}: the statistics are degenerate.')
    covmean = covmean.real
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Mean and standard deviation over `splits` consecutive equal parts of exp(E_x KL(p(y|x) || p(y))).

  As improved-GAN's reference code and torch-fidelity: the softmax of bias-free logits, each part's
  marginal p(y) taken over that part alone. The guided-diffusion evaluator is the same with 5,000-image
  parts, i.e. splits = N / 5000.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or not 1 <= splits <= len(logits):
    raise UserError(f'the Inception Score needs logits [N, classes] with N >= splits={splits}, got shape '
                    f'{logits.shape}.')
  log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  n = len(logits)
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
