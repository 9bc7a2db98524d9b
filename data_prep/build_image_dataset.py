"""Build a TFDS ArrayRecord image dataset from a folder of images.

  python data_prep/build_image_dataset.py --src=DIR --out=DIR --resolution=256
  python data_prep/build_image_dataset.py --src=DIR --out=DIR \
      --resolution=512,1024 --crop=random --seed=0

See `visgen_jax/data/folder.py` for what is stored and how images are resized.
Prints a report of converted and skipped files; exit code 2 on a usage error.
"""

import os
import sys

# Runnable from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from visgen_jax.data import folder  # pylint: disable=g-import-not-at-top

if __name__ == '__main__':
  sys.exit(folder.main(sys.argv[1:]))
