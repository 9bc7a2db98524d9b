"""Full-reference image quality: PSNR and SSIM of an image to its clean original.

Both take float images [H, W, C] in [0, 1]. SSIM is Wang et al. (2004) as it is usually
reported: an 11×11 Gaussian window of σ 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
statistics, averaged over the positions where the window fits and over channels.
"""

import numpy as np

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def psnr(image, clean) -> float:
  mse = np.mean((np.asarray(image, np.float64) - np.asarray(clean, np.float64)) ** 2)
  return float(-10 * np.log10(mse))


def _gaussian_mean(x):
  """Local Gaussian-weighted means of x [H, W, C] where the window fits: [H-10, W-10, C]."""
  taps = np.exp(-0.5 * ((np.arange(WINDOW) - WINDOW // 2) / SIGMA) ** 2)
  taps /= taps.sum()
  for axis in (0, 1):  # the 2-D window is separable
    x = np.lib.stride_tricks.sliding_window_view(x, WINDOW, axis=axis) @ taps
  return x


def ssim(image, clean) -> float:
  x, y = np.asarray(image, np.float64), np.asarray(clean, np.float64)
  if min(x.shape[:2]) < WINDOW:
    raise ValueError(f'SSIM needs images of at least {WINDOW}x{WINDOW} pixels, got {x.shape[:2]}.')
  mu_x, mu_y = _gaussian_mean(x), _gaussian_mean(y)
  var_x = _gaussian_mean(x * x) - mu_x ** 2
  var_y = _gaussian_mean(y * y) - mu_y ** 2
  cov = _gaussian_mean(x * y) - mu_x * mu_y
  c1, c2 = K1 ** 2, K2 ** 2  # the data range is 1
  index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return float(index.mean())
