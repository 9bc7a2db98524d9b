"""PSNR and SSIM against scikit-image on the same settings."""

import numpy as np
import pytest
import skimage.data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from visgen_jax.eval import image_quality


def _pair(channels):
  clean = skimage.data.astronaut()[100:164, 180:228, :channels] / 255.0  # not square: axes stay apart
  noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.1, clean.shape), 0, 1)
  return noisy, clean


@pytest.mark.parametrize('channels', [1, 3])
def test_ssim_is_skimages_gaussian_ssim(channels):
  noisy, clean = _pair(channels)
  want = structural_similarity(noisy, clean, win_size=11, gaussian_weights=True, sigma=1.5, K1=0.01, K2=0.03,
                               use_sample_covariance=False, data_range=1.0, channel_axis=-1)
  assert image_quality.ssim(noisy, clean) == pytest.approx(want, abs=1e-6)
  assert want < 0.9  # the noise is visible to SSIM


def test_ssim_of_an_image_with_itself_is_one():
  _, clean = _pair(3)
  assert image_quality.ssim(clean, clean) == pytest.approx(1.0, abs=1e-9)


def test_psnr_is_skimages():
  noisy, clean = _pair(3)
  assert image_quality.psnr(noisy, clean) == pytest.approx(peak_signal_noise_ratio(clean, noisy, data_range=1.0))
