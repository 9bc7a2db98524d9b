"""FID, sFID, Inception Score, KID and precision/recall from Inception outputs (numpy).

Conventions, so that numbers mean what published ones mean:
  FID / sFID   Fréchet distance between Gaussians fitted to pool3 / spatial features (mean and
               np.cov's unbiased covariance, float64); the matrix square root as pytorch-fid and
               the ADM evaluator take it: scipy.linalg.sqrtm of Σ₁Σ₂, again with 1e-6·I added to
               both covariances when it is not finite, an imaginary part discarded when every
               diagonal entry's is within 1e-3 of 0 (else an error). A covariance of no more
               than D images is singular: its range is then used (the same value, exactly and
               much faster; see _trace_sqrt_product).
  IS           the ADM evaluator's: softmax of the unbiased logits (pool3 · W, no bias), in
               consecutive splits of 5000 samples, exp(mean KL(p(y|x) ‖ p(y))) per split, averaged.
  KID          torch-fidelity's: the unbiased MMD² estimate with the kernel (x·y / d + 1)³ on
               pool3, over 100 subsets of 1000 (fewer when a side has fewer) drawn without
               replacement by numpy's RandomState(2020), samples first; mean and standard
               deviation over subsets (float64 here).
  precision / recall   the ADM evaluator's (Kynkäänniemi et al.): each set's manifold is the
               union of balls around its pool3 features with radius the squared Euclidean
               distance to the 3rd nearest neighbour in the set; precision is the fraction of
               samples inside the reference manifold, recall the fraction of reference images
               inside the samples' (distances in float32, as the evaluator's fallback).
"""

import dataclasses
import warnings

import numpy as np
import scipy.linalg

from visgen_jax.errors import UserError

IS_SPLIT_SIZE = 5000
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020
NEIGHBOURS = 3
_SQRTM_EPS = 1e-6
_ROW_BLOCK = 1000  # rows of a pairwise distance block: 1000 × N float32


@dataclasses.dataclass(frozen=True)
class Statistics:
  """A Gaussian fitted to features: mean mu [D] and covariance sigma [D, D], float64.

  basis: orthonormal columns [D, r] spanning sigma's range when it was fitted to no more than D
  images (r < D: the covariance is singular), else None. The Fréchet distance then works in that
  r-dimensional space (exactly the same value; see _trace_sqrt_product).
  """
  mu: np.ndarray
  sigma: np.ndarray
  basis: np.ndarray | None = None

  @classmethod
  def of(cls, features) -> 'Statistics':
    features = np.asarray(features, np.float64)
    n, dim = features.shape
    if n < 2:
      raise UserError(f'statistics need at least 2 images, got {n}.')
    mu = features.mean(axis=0)
    sigma = np.cov(features, rowvar=False)
    if n > dim:
      return cls(mu, sigma)
    _, singular, rows = np.linalg.svd(features - mu, full_matrices=False)
    rank = int((singular > singular[0] * max(n, dim) * np.finfo(np.float64).eps).sum())
    return cls(mu, sigma, rows[:rank].T)


def _sqrtm(matrix):
  with warnings.catch_warnings():  # a singular product is handled by the caller
    warnings.simplefilter('ignore', RuntimeWarning)
    return scipy.linalg.sqrtm(matrix)


def _trace_sqrt_product(a: Statistics, b: Statistics) -> float:
  """tr √(Σa Σb), the matrix square root taken as pytorch-fid and the ADM evaluator take it.

  When a covariance has a basis Q of its range (r < D columns), both are first projected onto
  it: Σa = Q Σa' Qᵀ, so Σa Σb has the nonzero eigenvalues of Σa' (Qᵀ Σb Q) and the same trace of
  its square root, from an r × r matrix. Exact, D³ → r³ work, and without the √(rounding) that
  each of the D − r zero eigenvalues adds to a D × D square root.
  """
  bases = [s.basis for s in (a, b) if s.basis is not None]
  if bases:
    q = min(bases, key=lambda basis: basis.shape[1])
    sigma_a, sigma_b = q.T @ a.sigma @ q, q.T @ b.sigma @ q
  else:
    sigma_a, sigma_b = a.sigma, b.sigma
  covmean = _sqrtm(sigma_a @ sigma_b)
  if not np.isfinite(covmean).all():
    offset = _SQRTM_EPS * np.eye(len(sigma_a))
    covmean = _sqrtm((sigma_a + offset) @ (sigma_b + offset))
  if np.iscomplexobj(covmean):
    imaginary = np.abs(np.diagonal(covmean).imag).max()
    if imaginary > 1e-3:
      raise UserError(f'the square root of the covariance product has an imaginary part of '
                      f'{imaginary:.3g} (more than 1e-3), so the Fréchet distance is undefined; '
                      'the statistics are not covariances of real features.')
    covmean = covmean.real
  return float(np.trace(covmean))


def frechet_distance(a: Statistics, b: Statistics) -> float:
  """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂), in float64."""
  if a.mu.shape != b.mu.shape:
    raise UserError(f'cannot compare statistics of {a.mu.shape[0]}-d and {b.mu.shape[0]}-d '
                    'features.')
  diff = a.mu - b.mu
  return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma)
               - 2 * _trace_sqrt_product(a, b))


def inception_score(logits_unbiased, split_size: int = IS_SPLIT_SIZE) -> float:
  """exp(E KL(p(y|x) ‖ p(y))) per consecutive split of `split_size`, averaged over splits."""
  logits = np.asarray(logits_unbiased, np.float64)
  log_p = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  scores = []
  for start in range(0, len(log_p), split_size):
    part = log_p[start:start + split_size]
    log_marginal = np.log(np.exp(part).mean(axis=0))
    kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


def _unbiased_mmd2(x, y):
  """The unbiased MMD² of two equal-size sets with the kernel (x·y / d + 1)³."""
  kernel = lambda u, v: (u @ v.T / x.shape[1] + 1) ** 3
  m = len(x)
  within = (kernel(x, x).sum() - np.trace(kernel(x, x)) + kernel(y, y).sum()
            - np.trace(kernel(y, y))) / (m * (m - 1))
  return within - 2 * kernel(x, y).sum() / (m * m)


def kernel_inception_distance(samples, reference, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED):
  """(mean, standard deviation) of the unbiased MMD² over random subsets of pool3 features."""
  samples, reference = np.asarray(samples, np.float64), np.asarray(reference, np.float64)
  size = min(subset_size, len(samples), len(reference))
  if size < 2:
    raise UserError(f'KID needs at least 2 images on each side, got {len(samples)} and '
                    f'{len(reference)}.')
  rng = np.random.RandomState(seed)
  mmds = []
  for _ in range(subsets):
    x = samples[rng.choice(len(samples), size, replace=False)]
    y = reference[rng.choice(len(reference), size, replace=False)]
    mmds.append(_unbiased_mmd2(x, y))
  return float(np.mean(mmds)), float(np.std(mmds))


def _squared_distances(a, b):
  """Pairwise squared Euclidean distances [len(a), len(b)], float32, clipped at 0."""
  norms_a = (a * a).sum(axis=1)[:, None]
  norms_b = (b * b).sum(axis=1)[None, :]
  return np.maximum(norms_a - 2 * (a @ b.T) + norms_b, 0)


def manifold_radii(features, k: int = NEIGHBOURS):
  """Each feature's squared distance to its k-th nearest neighbour among the others."""
  features = np.asarray(features, np.float32)
  radii = np.empty(len(features), np.float32)
  for start in range(0, len(features), _ROW_BLOCK):
    distances = _squared_distances(features[start:start + _ROW_BLOCK], features)
    radii[start:start + _ROW_BLOCK] = np.partition(distances, k, axis=1)[:, k]  # [:, 0]: itself
  return radii


def _fraction_inside(points, centres, radii):
  """The fraction of `points` within the squared radius of some centre."""
  points, centres = np.asarray(points, np.float32), np.asarray(centres, np.float32)
  inside = 0
  for start in range(0, len(points), _ROW_BLOCK):
    distances = _squared_distances(points[start:start + _ROW_BLOCK], centres)
    inside += int((distances <= radii[None, :]).any(axis=1).sum())
  return inside / len(points)


def precision_recall(samples, reference, k: int = NEIGHBOURS) -> tuple[float, float]:
  """(precision, recall) of the samples' pool3 features against the reference's."""
  if min(len(samples), len(reference)) <= k:
    raise UserError(f'precision and recall need more than k={k} images on each side, got '
                    f'{len(samples)} and {len(reference)}.')
  precision = _fraction_inside(samples, reference, manifold_radii(reference, k))
  recall = _fraction_inside(reference, samples, manifold_radii(samples, k))
  return precision, recall


@dataclasses.dataclass(frozen=True)
class Measured:
  """What is known of one side of a comparison.

  features: the Inception outputs of its images ({'pool', 'spatial', 'logits_unbiased'}, one
    row per image), or None when only statistics were given;
  pool, spatial: the statistics of pool3 and spatial features (a file's own, when it has them;
    spatial may be None: a statistics file without mu_s / sigma_s).
  """
  features: dict | None
  pool: Statistics
  spatial: Statistics | None

  @classmethod
  def of(cls, features: dict) -> 'Measured':
    return cls(features, Statistics.of(features['pool']), Statistics.of(features['spatial']))


def compare(samples: Measured, reference: Measured) -> tuple[dict, dict]:
  """({metric: value}, {metric: why it was not computed}) for fid, sfid, inception_score, kid
  (with kid_std), precision and recall."""
  values, skipped = {'fid': frechet_distance(samples.pool, reference.pool)}, {}
  if samples.spatial is not None and reference.spatial is not None:
    values['sfid'] = frechet_distance(samples.spatial, reference.spatial)
  else:
    skipped['sfid'] = 'needs spatial statistics (mu_s, sigma_s) or images on both sides'
  if samples.features is not None:
    values['inception_score'] = inception_score(samples.features['logits_unbiased'])
  else:
    skipped['inception_score'] = 'needs the sample images'
  if samples.features is None or reference.features is None:
    skipped['kid'] = skipped['precision'] = skipped['recall'] = 'needs images on both sides'
    return values, skipped
  pool, reference_pool = samples.features['pool'], reference.features['pool']
  if min(len(pool), len(reference_pool)) >= 2:
    values['kid'], values['kid_std'] = kernel_inception_distance(pool, reference_pool)
  else:
    skipped['kid'] = 'needs at least 2 images on each side'
  if min(len(pool), len(reference_pool)) > NEIGHBOURS:
    values['precision'], values['recall'] = precision_recall(pool, reference_pool)
  else:
    skipped['precision'] = skipped['recall'] = f'needs more than {NEIGHBOURS} images on each side'
  return values, skipped
