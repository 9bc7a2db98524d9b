"""Build a TFDS ArrayRecord dataset of images and their DiffusionRig buffers.

  python data_prep/build_buffer_dataset.py --images=DIR --buffers=DIR --out=DIR --resolution=256

See `visgen_jax/data/rig_buffers.py` (or --help) for the .npz format and the checks.
Prints a report of skipped pairs; exit code 2 on a usage error.
"""

import os
import sys

# Runnable from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from visgen_jax.data import rig_buffers  # pylint: disable=g-import-not-at-top

if __name__ == '__main__':
  sys.exit(rig_buffers.main(sys.argv[1:]))
