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
