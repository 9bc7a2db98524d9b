"""Mask2Former (MaskCLIP's proposal network) against PyTorch on random weights: the bilinear
sampler against grid_sample, the ResNet-50 backbone against torchvision, and the whole network
(backbone, pixel decoder, masked-attention decoder, heads) against transformers' Mask2Former."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visgen_jax import convert
from visgen_jax.bench import oracles
from visgen_jax.errors import UserError
from visgen_jax.models import mask2former, resnet


def import_torch():
  torch = pytest.importorskip('torch')
  oracles.declare_torchvision_ops()
  return torch


def randomised(module, torch, seed, norm_scale=0.0):
  """Every parameter and BatchNorm statistic drawn at random (zero-initialised layers would hide
  errors); norm scales around `norm_scale` (1 keeps the signal of a deep transformer stack,
  0 keeps a deep ResNet's activations small)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if tensor.dtype.is_floating_point:
        values = torch.randn(tensor.shape, generator=generator) * 0.1
        if name.endswith('running_var'):
          values = values.abs() + 0.5
        elif name.endswith('weight') and tensor.ndim == 1:
          values = values + norm_scale
        tensor.copy_(values)
  return module.eval()


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
  net = randomised(torchvision.models.resnet50(num_classes=8), torch, seed=0)
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


# transformers' parameter names → ours (hf_to_flax then renames the leaves).
HF_RENAMES = [
    (r'^model\.pixel_level_module\.encoder\.embedder\.embedder\.convolution', 'backbone/conv1'),
    (r'^model\.pixel_level_module\.encoder\.embedder\.embedder\.normalization', 'backbone/bn1'),
    (r'^model\.pixel_level_module\.encoder\.encoder\.stages\.(\d+)\.layers\.(\d+)\.',
     lambda m: f'backbone/layer{int(m[1]) + 1}_{m[2]}/'),
    (r'shortcut\.convolution', 'downsample_0'), (r'shortcut\.normalization', 'downsample_1'),
    (r'layer\.(\d)\.convolution', lambda m: f'conv{int(m[1]) + 1}'),
    (r'layer\.(\d)\.normalization', lambda m: f'bn{int(m[1]) + 1}'),
    (r'^model\.pixel_level_module\.decoder\.', 'pixel_decoder/'),
    (r'^pixel_decoder/level_embed', 'pixel_decoder/transformer/level_embed'),
    (r'input_projections\.(\d)\.(\d)', r'input_proj_\1_\2'),
    (r'^pixel_decoder/encoder\.layers\.(\d+)\.', r'pixel_decoder/transformer/encoder/layers_\1/'),
    (r'self_attn_layer_norm', 'norm1'), (r'final_layer_norm', 'norm2'), (r'fc1', 'linear1'), (r'fc2', 'linear2'),
    (r'mask_projection', 'mask_features'),
    (r'(adapter|layer)_1\.0', r'\1_1'), (r'(adapter|layer)_1\.1', r'\1_1/norm'),
    (r'^model\.transformer_module\.queries_embedder', 'predictor/query_embed'),
    (r'^model\.transformer_module\.queries_features', 'predictor/query_feat'),
    (r'^model\.transformer_module\.level_embed', 'predictor/level_embed'),
    (r'^model\.transformer_module\.decoder\.layernorm', 'predictor/decoder_norm'),
    (r'^model\.transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d)\.0',
     r'predictor/mask_embed/layers_\1'),
    (r'^class_predictor', 'predictor/class_embed'),
]
HF_DECODER_LAYER = [  # within model.transformer_module.decoder.layers.N.
    (r'^self_attn\.', 'transformer_self_attention_layers_{}/self_attn/'),
    (r'^self_attn_layer_norm', 'transformer_self_attention_layers_{}/norm'),
    (r'^cross_attn\.', 'transformer_cross_attention_layers_{}/multihead_attn/'),
    (r'^cross_attn_layer_norm', 'transformer_cross_attention_layers_{}/norm'),
    (r'^fc(\d)', r'transformer_ffn_layers_{}/linear\1'),
    (r'^final_layer_norm', 'transformer_ffn_layers_{}/norm'),
]


def hf_to_flax(state_dict):
  """Our Mask2Former's params from transformers' Mask2FormerForUniversalSegmentation state dict."""
  flat = {}
  for key, value in state_dict.items():
    value = value.numpy()
    if key.endswith('num_batches_tracked') or key.startswith('criterion.'):
      continue
    layer = re.match(r'^model\.transformer_module\.decoder\.layers\.(\d+)\.(.*)', key)
    if layer:
      rest = layer[2]
      for pattern, replacement in HF_DECODER_LAYER:
        rest = re.sub(pattern, replacement.replace('{}', layer[1]), rest)
      path = 'predictor/' + rest
    else:
      path = key
      for pattern, replacement in HF_RENAMES:
        path = re.sub(pattern, replacement, path)
    module, _, leaf = path.replace('.', '/').rpartition('/')
    if leaf in ('in_proj_weight', 'in_proj_bias'):
      for name, part in zip(('q_proj', 'k_proj', 'v_proj'), np.split(value, 3)):
        flat[f'{module}/{name}/' + ('kernel' if leaf == 'in_proj_weight' else 'bias')] = part.T
      continue
    if leaf == 'weight' and module.endswith(('query_embed', 'query_feat', 'level_embed')):
      leaf = 'embedding'
    elif leaf == 'weight':
      leaf = {4: 'kernel', 2: 'kernel', 1: 'scale'}[value.ndim]
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    else:
      leaf = {'running_mean': 'mean', 'running_var': 'var'}.get(leaf, leaf)
    flat[f'{module}/{leaf}'] = value
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): jnp.asarray(v) for k, v in flat.items()})


# A ResNet-18 backbone keeps the test fast (ResNet-50's bottlenecks are checked against torchvision above).
TINY = dict(num_queries=10, hidden_dim=64, mask_dim=64, num_heads=8, ffn_dim=128, dec_layers=6, enc_layers=2,
            enc_ffn_dim=128, enc_points=4, backbone_depth=18, backbone_width=16)


def transformers_mask2former(torch, seed):
  transformers = pytest.importorskip('transformers')
  kind, depths = resnet.BLOCKS[TINY['backbone_depth']]
  expansion = 4 if kind == 'bottleneck' else 1
  backbone = transformers.ResNetConfig(
      embedding_size=TINY['backbone_width'], hidden_sizes=[TINY['backbone_width'] * expansion * 2**k for k in range(4)],
      depths=list(depths), layer_type=kind, out_features=['stage1', 'stage2', 'stage3', 'stage4'])
  config = transformers.Mask2FormerConfig(
      backbone_config=backbone, feature_size=TINY['hidden_dim'], mask_feature_size=TINY['mask_dim'],
      hidden_dim=TINY['hidden_dim'], num_attention_heads=TINY['num_heads'], dim_feedforward=TINY['ffn_dim'],
      encoder_feedforward_dim=TINY['enc_ffn_dim'], encoder_layers=TINY['enc_layers'],
      decoder_layers=TINY['dec_layers'] + 1,  # counts the initial queries' prediction
      num_queries=TINY['num_queries'], num_labels=1, output_auxiliary_logits=True)
  return randomised(transformers.Mask2FormerForUniversalSegmentation(config), torch, seed, norm_scale=1.0)


def test_mask2former_matches_transformers_pixel_decoder_and_every_prediction():
  torch = import_torch()
  net = transformers_mask2former(torch, seed=5)
  params = hf_to_flax(net.state_dict())
  images = np.random.default_rng(1).uniform(0, 255, size=(2, 64, 96, 3)).astype(np.float32)
  model = mask2former.Mask2Former(**TINY)
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
  assert len(predictions) == len(wanted) == TINY['dec_layers'] + 1
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
  model = mask2former.Mask2Former(**TINY)
  with pytest.raises(UserError, match='multiples of 32'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 80, 3)))
