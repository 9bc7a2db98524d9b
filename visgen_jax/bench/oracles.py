"""Importing the PyTorch reference implementations beside the project's CPU torch, and building
them with random weights mapped onto ours.

Shared by the parity tests (tests/helpers.py, which skips when an oracle is
absent) and the benchmarks (which need the oracle).
"""

import re

import flax
import jax.numpy as jnp
import numpy as np

_LIBRARY = []  # keeps the torchvision schema registration alive for the process


def declare_torchvision_ops():
  """Declare torchvision's compiled op schemas so its pure-Python parts import.

  torchvision's registry wheel is built against a newer torch than the CPU one
  we pin; its compiled ops fail to register (`operator torchvision::nms does not
  exist`), so their schemas are declared first. open_clip uses only the
  pure-Python parts of torchvision. Safe to call more than once.
  """
  import torch
  if _LIBRARY:
    return
  try:
    library = torch.library.Library('torchvision', 'DEF')
    library.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    library.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  except RuntimeError:
    return  # declared by someone else in this process
  _LIBRARY.append(library)


def import_open_clip():
  """open_clip_torch (ImportError if it or torch is not installed)."""
  declare_torchvision_ops()
  import open_clip
  return open_clip


def fid_inception_torch(seed: int = 0):
  """pytorch-fid's InceptionV3 (its FID blocks and its resize / normalise wrapper, pool3 output)
  with random weights instead of the downloaded file, in eval mode, and those weights as a
  state dict (name → torch tensor, the layout of pt_inception-2015-12-05-6726825d.pth).

  The weights keep activations near unit scale through the 94 layers (He-scaled kernels, batch
  norm statistics near the identity), so a comparison at 1e-4 means something. Raises
  ImportError if torch, torchvision or pytorch-fid is missing.
  """
  import torch
  declare_torchvision_ops()
  import torchvision
  from unittest import mock
  from pytorch_fid import inception as fid_inception
  net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                        init_weights=False)
  # The blocks pytorch-fid's fid_inception_v3() puts in before loading the downloaded weights.
  net.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
  for name, channels in (('6b', 128), ('6c', 160), ('6d', 160), ('6e', 192)):
    setattr(net, f'Mixed_{name}', fid_inception.FIDInceptionC(768, channels_7x7=channels))
  net.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
  net.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
  generator = torch.Generator().manual_seed(seed)

  def draw(name, like):
    if name.endswith('num_batches_tracked'):
      return like
    rand = lambda: torch.rand(like.shape, generator=generator)
    normal = lambda std: std * torch.randn(like.shape, generator=generator)
    if name.endswith('conv.weight'):
      return normal((2 / like[0].numel()) ** 0.5)
    if name == 'fc.weight':
      return normal(like.shape[1] ** -0.5)
    if name.endswith('running_var'):
      return 0.5 + rand()
    if name.endswith('bn.weight'):
      return 0.8 + 0.4 * rand()
    return normal(0.1)  # biases and running means

  state_dict = {name: draw(name, value) for name, value in net.state_dict().items()}
  net.load_state_dict(state_dict)
  with mock.patch.object(fid_inception, 'fid_inception_v3', lambda: net):
    model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
  return model.eval(), state_dict


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


# transformers' parameter names → ours (mask2former_from_transformers then renames the leaves).
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


def mask2former_from_transformers(state_dict):
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


# A ResNet-18 backbone keeps the parity test fast (ResNet-50's bottlenecks are checked against torchvision above).
MASK2FORMER_SMALL = dict(num_queries=10, hidden_dim=64, mask_dim=64, num_heads=8, ffn_dim=128, dec_layers=6,
                         enc_layers=2, enc_ffn_dim=128, enc_points=4, backbone_depth=18, backbone_width=16)


def transformers_mask2former(torch, fields: dict, seed: int):
  """transformers' Mask2FormerForUniversalSegmentation with visgen_jax Mask2Former `fields` (one class,
  every auxiliary prediction returned), weights `randomised` with norm scales around 1."""
  import transformers
  from visgen_jax.models import resnet
  kind, depths = resnet.BLOCKS[fields['backbone_depth']]
  expansion = 4 if kind == 'bottleneck' else 1
  width = fields['backbone_width']
  backbone = transformers.ResNetConfig(
      embedding_size=width, hidden_sizes=[width * expansion * 2**k for k in range(4)], depths=list(depths),
      layer_type=kind, out_features=['stage1', 'stage2', 'stage3', 'stage4'])
  config = transformers.Mask2FormerConfig(
      backbone_config=backbone, feature_size=fields['hidden_dim'], mask_feature_size=fields['mask_dim'],
      hidden_dim=fields['hidden_dim'], num_attention_heads=fields['num_heads'], dim_feedforward=fields['ffn_dim'],
      encoder_feedforward_dim=fields['enc_ffn_dim'], encoder_layers=fields['enc_layers'],
      decoder_layers=fields['dec_layers'] + 1,  # counts the initial queries' prediction
      num_queries=fields['num_queries'], num_labels=1, output_auxiliary_logits=True)
  return randomised(transformers.Mask2FormerForUniversalSegmentation(config), torch, seed, norm_scale=1.0)
