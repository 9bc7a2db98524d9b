"""FID Inception vs pytorch-fid on shared random weights; its converter.

Parity tolerance: max |flax − torch| ≤ 1e-4 over each output (activations are near unit scale:
see visgen_jax.bench.oracles.fid_inception_torch).
"""

import jax
import numpy as np
import pytest

from visgen_jax.bench import oracles
from visgen_jax.convert import inception as inception_convert
from visgen_jax.errors import UserError
from visgen_jax.models.inception import InceptionV3


@pytest.fixture(scope='module')
def oracle():
  """(pytorch-fid's InceptionV3 with random weights, its state dict as numpy)."""
  pytest.importorskip('torch')
  pytest.importorskip('pytorch_fid')
  model, state_dict = oracles.fid_inception_torch(seed=0)
  return model, {k: v.numpy() for k, v in state_dict.items()}


def test_features_logits_and_spatial_match_pytorch_fid(oracle):
  import torch
  model, state_dict = oracle
  params = inception_convert.convert_inception_state_dict(state_dict)
  images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  mixed_6d = model.blocks[2][6]  # block 2 runs Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, ...
  captured = {}
  mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.update(out=out))
  with torch.no_grad():
    pool = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))[0][:, :, 0, 0]
  fc_weight, fc_bias = state_dict['fc.weight'], state_dict['fc.bias']
  reference = {'pool': pool.numpy(), 'logits': pool.numpy() @ fc_weight.T + fc_bias,
               'logits_unbiased': pool.numpy() @ fc_weight.T,
               'spatial': captured['out'].numpy().transpose(0, 2, 3, 1)[..., :7].reshape(2, -1)}
  out = jax.jit(InceptionV3().apply)({'params': params}, images)
  for name, expected in reference.items():
    assert out[name].shape == expected.shape, name
    np.testing.assert_allclose(out[name], expected, rtol=0, atol=1e-4, err_msg=name)
  assert reference['spatial'].shape == (2, 17 * 17 * 7)
  assert np.abs(reference['pool']).max() > 1  # the weights keep the signal: not a 0 == 0 check


def test_converter_names_every_key_it_cannot_map(oracle):
  _, state_dict = oracle
  # torchvision's ImageNet InceptionV3 instead: an auxiliary head and 1000 classes.
  other = dict(state_dict, **{'AuxLogits.fc.weight': np.zeros((1000, 768), np.float32),
                              'fc.weight': np.zeros((1000, 2048), np.float32)})
  del other['Mixed_7c.branch_pool.bn.running_var']
  with pytest.raises(UserError, match=r'^the state dict is not the FID Inception of pytorch-fid '
                     r'\(pt_inception-2015-12-05-6726825d.pth\): 1 keys with no counterpart '
                     r'\(AuxLogits.fc.weight\); 1 params with no key '
                     r'\(Mixed_7c/branch_pool/var\); 1 keys of another shape '
                     r'\(fc.weight \(1000, 2048\)\)\.$'):
    inception_convert.convert_inception_state_dict(other)
  with pytest.raises(UserError, match=r'^w.pt is not the FID Inception \(it has no '
                     r'Mixed_6d.branch1x1.conv.weight\); give pytorch-fid'):
    inception_convert.convert_inception_state_dict({'conv.weight': np.zeros(3)}, 'w.pt')
