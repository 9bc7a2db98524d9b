"""Mask2Former (MaskCLIP's proposal network) against PyTorch on random weights: the bilinear
sampler against grid_sample, the ResNet-50 backbone against torchvision, and the whole network
(backbone, pixel decoder, masked-attention decoder, heads) against transformers' Mask2Former."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visgen_jax import convert
from visgen_jax.bench import oracles
from visgen_jax.models import mask2former, resnet


def import_torch():
  torch = pytest.importorskip('torch')
  oracles.declare_torchvision_ops()
  return torch


def test_grid_sample_matches_torch_values_and_gradients():
  torch = import_torch()
  rng = np.random.default_rng(0)
  values = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  grid = rng.uniform(-1.3, 1.3, size=(2, 40, 2)).astype(np.float32)  # some points fall outside: zeros there
  cotangent = rng.normal(size=(2, 40, 3)).astype(np.float32)
  loss = lambda v, g: jnp.sum(mask2former.grid_sample(v, g) * cotangent)
  got = mask2former.grid_sample(values, grid)
  got_dv, got_dg = jax.grad(loss, argnums=(0, 1))(values, grid)

  v = torch.tensor(values.transpose(0, 3, 1, 2), requires_grad=True)
  g = torch.tensor(grid[:, None], requires_grad=True)
  want = torch.nn.functional.grid_sample(v, g, mode='bilinear', padding_mode='zeros', align_corners=False)
  want = want[:, :, 0].permute(0, 2, 1)  # [N, C, 1, P] → [N, P, C]
  (want * torch.from_numpy(cotangent)).sum().backward()
  np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_dv), v.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_dg), g.grad.numpy()[:, 0], atol=1e-4)


def frozen_backbone(state_dict):
  """models.resnet params with norm='frozen' from a torchvision ResNet state dict."""
  params, stats = convert.diffusionrig.convert_resnet_state_dict(state_dict)
  flat = flax.traverse_util.flatten_dict(params)
  flat.update(flax.traverse_util.flatten_dict(stats))
  return flax.traverse_util.unflatten_dict(flat)


def test_resnet50_matches_torchvision_stage_outputs():
  torch = import_torch()
  torchvision = pytest.importorskip('torchvision')
  net = oracles.randomised(torchvision.models.resnet50(num_classes=8), torch, seed=0)
  params = frozen_backbone({k: v.numpy() for k, v in net.state_dict().items()})
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 64, 96, 3)).astype(np.float32)
  model = resnet.ResNet(num_outputs=None, depth=50, norm='frozen')
  got = jax.jit(model.apply)({'params': params}, x)  # compiling is faster than running eagerly
  with torch.no_grad():
    h = net.maxpool(net.relu(net.bn1(net.conv1(torch.from_numpy(x.transpose(0, 3, 1, 2))))))
    for stage in range(4):
      h = getattr(net, f'layer{stage + 1}')(h)
      np.testing.assert_allclose(np.asarray(got[f'res{stage + 2}']), h.numpy().transpose(0, 2, 3, 1), atol=1e-4,
                                 err_msg=f'res{stage + 2}')


def test_mask2former_matches_transformers_pixel_decoder_and_every_prediction():
  torch = import_torch()
  pytest.importorskip('transformers')
  net = oracles.transformers_mask2former(torch, oracles.MASK2FORMER_SMALL, seed=5)
  params = oracles.mask2former_from_transformers(net.state_dict())
  images = np.random.default_rng(1).uniform(0, 255, size=(2, 64, 96, 3)).astype(np.float32)
  model = mask2former.Mask2Former(**oracles.MASK2FORMER_SMALL)
  apply = jax.jit(lambda variables, x: model.apply(variables, x, capture_intermediates=True))
  predictions, state = apply({'params': params}, images)
  mask_features, levels = state['intermediates']['pixel_decoder']['__call__'][0]

  normalised = (images - np.float32(mask2former.PIXEL_MEAN)) / np.float32(mask2former.PIXEL_STD)
  with torch.no_grad():
    out = net(torch.from_numpy(normalised.transpose(0, 3, 1, 2)), output_hidden_states=True)
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(mask_features), nhwc(out.pixel_decoder_last_hidden_state), atol=1e-4)
  for got, want in zip(levels, out.pixel_decoder_hidden_states, strict=True):
    np.testing.assert_allclose(np.asarray(got), nhwc(want), atol=1e-4)
  wanted = [(a['class_queries_logits'], a['masks_queries_logits']) for a in out.auxiliary_logits]
  wanted.append((out.class_queries_logits, out.masks_queries_logits))
  assert len(predictions) == len(wanted) == oracles.MASK2FORMER_SMALL['dec_layers'] + 1
  # The weights exercise masked attention: masks that cover part of a level, masks that are empty
  # (the query attends everywhere), and no logit so near 0 that rounding could flip it.
  sizes = [level.shape[-2:] for level in out.pixel_decoder_hidden_states]
  resized = [torch.nn.functional.interpolate(mask, sizes[i % len(sizes)], mode='bilinear', align_corners=False)
             for i, (_, mask) in enumerate(wanted[:-1])]
  assert all(0 < (z >= 0).float().mean() < 1 for z in resized)
  assert sum(int((z < 0).flatten(2).all(-1).sum()) for z in resized) > 0
  assert min(float(z.abs().min()) for z in resized) > 1e-4
  for i, ((got_class, got_mask), (want_class, want_mask)) in enumerate(zip(predictions, wanted)):
    np.testing.assert_allclose(np.asarray(got_class), want_class.numpy(), atol=1e-4, err_msg=f'classes {i}')
    np.testing.assert_allclose(np.asarray(got_mask), want_mask.numpy(), atol=1e-4, err_msg=f'masks {i}')


def test_mask2former_rejects_images_off_the_stride():
  model = mask2former.Mask2Former(**oracles.MASK2FORMER_SMALL)
  with pytest.raises(ValueError, match="multiples of 32"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 80, 3)))
