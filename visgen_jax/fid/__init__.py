"""FID, sFID, Inception Score, KID and precision/recall with the FID Inception
(visgen_jax.models.inception), meaning what pytorch-fid, the ADM evaluator and torch-fidelity mean.

  metrics.py   the formulas (numpy, float64) and `compare`, which computes what two sides allow
  features.py  Inception outputs of many images: batched, over devices and processes
  inputs.py    a side from a path: image folder, dataset, .npz batch or .npz statistics
  __main__.py  python -m visgen_jax.fid SAMPLES REFERENCE --inception=PATH

The evaluator type 'fid' (visgen_jax/eval/fid.py) uses the same pieces on a system's samples.
"""
