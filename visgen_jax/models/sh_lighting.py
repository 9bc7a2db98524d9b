"""Second-order spherical-harmonics lighting as DECA renders it, its inverse, and its rotation.

  shade(normals, albedo, alpha, light)        the `rendered` buffer: albedo · shading · alpha
  estimate_light(image, normals, albedo, mask) least-squares light [9, 3] (the image is linear in it)
  rotate_light(light, angle)                   the light turned about the vertical (y) axis

Normals are [..., 3] (x, y, z), light is [9, 3] (coefficient, colour). The
shading of colour c is Σ_k light[k, c] · c_k · Y_k(N) with the basis
Y = [1, x, y, z, xy, xz, yz, x² − y², 3z² − 1] and DECA's constants; no
clamping, no gamma.
"""

import math

import jax.numpy as jnp
import numpy as np

NUM_COEFFS = 9
_C0 = 1 / math.sqrt(4 * math.pi)
_C1 = (2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi))
_C2 = (math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi))
_C3 = (math.pi / 4) * (3 / 2) * math.sqrt(5 / (12 * math.pi))
_C4 = (math.pi / 4) * (1 / 2) * math.sqrt(5 / (4 * math.pi))
CONSTANTS = (_C0, _C1, _C1, _C1, _C2, _C2, _C2, _C3, _C4)


def basis(normals):
  """c_k · Y_k(N): [..., 9]."""
  x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
  one = jnp.ones_like(x)
  ys = jnp.stack([one, x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1], axis=-1)
  return ys * jnp.asarray(CONSTANTS, ys.dtype)


def shading(normals, light):
  """[..., 3]: the SH irradiance of `light` [9, 3] at each normal."""
  return basis(normals) @ light


def shade(normals, albedo, alpha, light):
  """The rendered image [..., 3]: albedo · shading · alpha (alpha [...])."""
  return albedo * shading(normals, light) * alpha[..., None]


def estimate_light(image, normals, albedo, mask):
  """The light [9, 3] whose render best matches `image` [H, W, 3] in least squares over the
  pixels where `mask` [H, W] is set; exact on a noise-free render whose masked normals span the basis."""
  weight = (mask > 0).astype(jnp.float32)[..., None]  # [H, W, 1]
  design = basis(normals)[..., None, :] * albedo[..., :, None] * weight[..., None]  # [H, W, 3, 9]
  target = image * weight
  design = design.reshape(-1, 3, NUM_COEFFS).transpose(1, 0, 2)  # [3, N, 9]
  target = target.reshape(-1, 3).T  # [3, N]
  solve = lambda a, b: jnp.linalg.lstsq(a, b)[0]
  return jnp.stack([solve(design[c], target[c]) for c in range(3)], axis=-1)


def _fibonacci_sphere(n: int) -> np.ndarray:
  """n directions spread evenly over the sphere."""
  i = np.arange(n) + 0.5
  y = 1 - 2 * i / n
  r = np.sqrt(1 - y * y)
  phi = i * math.pi * (3 - math.sqrt(5))
  return np.stack([r * np.cos(phi), y, r * np.sin(phi)], axis=-1).astype(np.float32)


def rotate_light(light, angle):
  """The light turned by `angle` radians about the vertical axis: its shading at N equals the
  old shading at the normal turned back. Second-order SH are closed under rotation, so a
  least-squares fit on directions over the sphere is exact."""
  directions = jnp.asarray(_fibonacci_sphere(64))
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Rotation about y by -angle (x' = cos x − sin z, z' = sin x + cos z with angle negated).
  back = jnp.stack([cos * directions[:, 0] + sin * directions[:, 2], directions[:, 1],
                    -sin * directions[:, 0] + cos * directions[:, 2]], axis=-1)
  return jnp.linalg.lstsq(basis(directions), shading(back, light))[0]
