"""Importing the PyTorch reference implementations beside the project's CPU torch.

Shared by the parity tests (tests/helpers.py, which skips when an oracle is
absent) and the benchmarks (which need the oracle).
"""

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
