"""FID and Inception Score from Inception outputs, in float64 NumPy/SciPy as the reference implementations."""

import dataclasses
import os

import numpy as np
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


def frechet_distance(a: Statistics, b: Statistics) -> float:
  """||mu_a - mu_b||^2 + Tr(sigma_a + sigma_b - 2 sqrt(sigma_a sigma_b)), the distance pytorch-fid computes.

  Tr sqrt(sigma_a sigma_b) is the sum of the square roots of the eigenvalues of sigma_a sigma_b, which are those of
  the symmetric S sigma_b S with S = sqrt(sigma_a): two symmetric eigendecompositions instead of pytorch-fid's general
  `sqrtm` (about ten times faster at 2048 x 2048, and no complex rounding). Eigenvalues below zero are rounding of
  a singular covariance and count as zero.
  """
  mu_a, mu_b = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
  sigma_a, sigma_b = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
  if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
    raise UserError(f'statistics do not match: mu {mu_a.shape} vs {mu_b.shape}, sigma {sigma_a.shape} vs '
                    f'{sigma_b.shape}; compute both with the same network (2048-d pool3 features).')
  w, u = np.linalg.eigh((sigma_a + sigma_a.T) / 2)
  root_a = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
  product = root_a @ sigma_b @ root_a
  trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)))
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt)


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
