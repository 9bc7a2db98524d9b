"""DiffusionRig's pieces: the SH shader, light estimator and rotation; ResNet-18 and the
code-conditioned ADM UNet against PyTorch (torchvision, guided_diffusion extended with
DiffusionRig's code layers), through the released checkpoint's converter."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visgen_jax import convert
from visgen_jax.bench import oracles
from visgen_jax.models import resnet, sh_lighting
from visgen_jax.models.adm_unet import ADMUNet
from visgen_jax.train import config as config_lib


def unit_normals(shape, seed=0):
  n = np.random.default_rng(seed).normal(size=(*shape, 3)).astype(np.float32)
  return n / np.linalg.norm(n, axis=-1, keepdims=True)


def random_light(seed=1):
  return np.random.default_rng(seed).normal(size=(9, 3)).astype(np.float32)


def test_shader_is_the_sh_formula():
  normals, light = unit_normals((5, 4)), random_light()
  albedo = np.random.default_rng(2).uniform(size=(5, 4, 3)).astype(np.float32)
  alpha = (np.arange(20).reshape(5, 4) % 3 > 0).astype(np.float32)
  pi = math.pi
  c = [1 / math.sqrt(4 * pi), (2 * pi / 3) * math.sqrt(3 / (4 * pi)), (pi / 4) * 3 * math.sqrt(5 / (12 * pi)),
       (pi / 4) * 1.5 * math.sqrt(5 / (12 * pi)), (pi / 4) * 0.5 * math.sqrt(5 / (4 * pi))]
  want = np.zeros((5, 4, 3))
  for i in range(5):
    for j in range(4):
      x, y, z = normals[i, j].astype(np.float64)
      terms = [c[0], c[1] * x, c[1] * y, c[1] * z, c[2] * x * y, c[2] * x * z, c[2] * y * z,
               c[3] * (x * x - y * y), c[4] * (3 * z * z - 1)]
      for ch in range(3):
        want[i, j, ch] = albedo[i, j, ch] * sum(t * light[k, ch] for k, t in enumerate(terms)) * alpha[i, j]
  got = sh_lighting.shade(jnp.asarray(normals), jnp.asarray(albedo), jnp.asarray(alpha), jnp.asarray(light))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_estimator_recovers_a_known_light_from_a_noise_free_render():
  normals, light = unit_normals((16, 16), seed=3), random_light(seed=4)
  albedo = np.random.default_rng(5).uniform(0.2, 1, size=(16, 16, 3)).astype(np.float32)
  mask = np.zeros((16, 16), np.float32)
  mask[2:14, 3:13] = 1
  image = sh_lighting.shade(normals, albedo, mask, light) + 5.0 * (1 - mask[..., None])  # background ignored
  estimated = sh_lighting.estimate_light(image, normals, albedo, mask)
  np.testing.assert_allclose(np.asarray(estimated), light, atol=1e-4)


def test_rotated_light_shades_the_turned_normals_alike():
  normals, light = unit_normals((64,), seed=6), random_light(seed=7)
  angle = 0.7
  turned = sh_lighting.rotate_light(light, angle)
  # Turning a normal by +angle about y must see the old light as the old normal did.
  cos, sin = math.cos(angle), math.sin(angle)
  rotation = np.array([[cos, 0, -sin], [0, 1, 0], [sin, 0, cos]], np.float32)
  np.testing.assert_allclose(np.asarray(sh_lighting.shading(normals @ rotation.T, turned)),
                             np.asarray(sh_lighting.shading(normals, light)), atol=1e-4)
  np.testing.assert_allclose(np.asarray(sh_lighting.rotate_light(light, 2 * math.pi)), light, atol=1e-4)


def torch_oracles():
  torch = pytest.importorskip('torch')
  pytest.importorskip('guided_diffusion')
  oracles.declare_torchvision_ops()
  torchvision = pytest.importorskip('torchvision')
  return torch, torchvision


def randomised(module, torch, seed):
  """Every parameter and BatchNorm statistic drawn at random (zero-initialised layers would hide errors)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if tensor.dtype.is_floating_point:
        values = torch.randn(tensor.shape, generator=generator) * 0.1
        tensor.copy_(values.abs() + 0.5 if name.endswith('running_var') else values)
  return module.eval()


def test_resnet18_matches_torchvision_in_eval_and_train_mode():
  torch, torchvision = torch_oracles()
  net = randomised(torchvision.models.resnet18(num_classes=64), torch, seed=0)
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  params, stats = convert.diffusionrig.convert_resnet_state_dict(state)
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 64, 64, 3)).astype(np.float32)
  model = resnet.ResNet18(num_outputs=64)
  got = model.apply({'params': params, 'batch_stats': stats}, x)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
  # Training mode: batch statistics, and running statistics moved as torch moves them.
  got, updated = model.apply({'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
  with torch.no_grad():
    want = net.train()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
  np.testing.assert_allclose(np.asarray(updated['batch_stats']['layer2_0']['downsample_1']['var']),
                             net.layer2[0].downsample[1].running_var.numpy(), rtol=1e-4)


UNET = dict(image_size=32, in_channels=12, model_channels=32, out_channels=3, num_res_blocks=1,
            attention_resolutions=(16,), channel_mult=(1, 2), num_heads=1, use_scale_shift_norm=True,
            resblock_updown=True)


def code_conditioned_unet(torch, code_dim):
  """guided_diffusion's UNetModel with DiffusionRig's code layers: every ResBlock gets
  `cond_emb_layers` (SiLU → Linear → scale, shift) applied after the time embedding's."""
  from guided_diffusion import unet as gd  # pylint: disable=g-import-not-at-top
  model = gd.UNetModel(**{k: v for k, v in UNET.items() if k != 'attention_resolutions'},
                       attention_resolutions=(UNET['image_size'] // 16,))
  for block in model.modules():
    if isinstance(block, gd.ResBlock):
      block.cond_emb_layers = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(code_dim, 2 * block.out_channels))

  def res_forward(block, x, emb, code):
    if block.updown:
      h = block.in_layers[-1](block.h_upd(block.in_layers[:-1](x)))
      x = block.x_upd(x)
    else:
      h = block.in_layers(x)
    h = block.out_layers[0](h)
    for cond in (block.emb_layers(emb), block.cond_emb_layers(code)):
      scale, shift = torch.chunk(cond[..., None, None], 2, dim=1)
      h = h * (1 + scale) + shift
    return block.skip_connection(x) + block.out_layers[1:](h)

  def run(sequence, h, emb, code):
    for layer in sequence:
      h = res_forward(layer, h, emb, code) if isinstance(layer, gd.ResBlock) else layer(h)
    return h

  def forward(x, t, code):
    emb = model.time_embed(gd.timestep_embedding(t, model.model_channels))
    skips, h = [], x
    for block in model.input_blocks:
      h = run(block, h, emb, code)
      skips.append(h)
    h = run(model.middle_block, h, emb, code)
    for block in model.output_blocks:
      h = run(block, torch.cat([h, skips.pop()], dim=1), emb, code)
    return model.out(h)

  return model, forward


def test_released_checkpoint_converts_to_the_same_outputs(tmp_path):
  torch, torchvision = torch_oracles()
  unet, unet_forward = code_conditioned_unet(torch, code_dim=64)
  randomised(unet, torch, seed=1)
  encoder = randomised(torchvision.models.resnet18(num_classes=64), torch, seed=2)
  state = {**{f'denoisingUNet.{k}': v for k, v in unet.state_dict().items()},
           **{f'encoder.{k}': v for k, v in encoder.state_dict().items()}}
  path = str(tmp_path / 'model050000.pt')
  torch.save(state, path)
  config = config_lib.load_config('configs/adm_ffhq256.py:tiny', ['model.image_size=32'])
  params = convert.read_foreign(path, config)

  rng = np.random.default_rng(3)
  image = rng.uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
  x = rng.normal(size=(2, 32, 32, 12)).astype(np.float32)
  t = np.array([10, 900])
  code = resnet.ResNet18(64).apply({'params': params['encoder'], 'batch_stats': params['batch_stats']['encoder']},
                                   image)
  got = ADMUNet(**UNET, code_dim=64).apply({'params': params['unet']}, x, t, code=code)
  with torch.no_grad():
    want_code = encoder(torch.from_numpy(image.transpose(0, 3, 1, 2)))
    want = unet_forward(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), want_code)
  np.testing.assert_allclose(np.asarray(code), want_code.numpy(), atol=1e-4)
  np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-4)
