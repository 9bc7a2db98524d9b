"""Datasets and the input pipeline.

  registry.py      data sources by name (config.data.name) and `validate`
  pipeline.py      one grain iterator builder for every source, example_batch
  images.py        sources 'sample', 'sample_faces', 'folder'
  image_folder.py  source 'image_folder' (a small folder read directly, e.g. an album)
  segmentation/    sources 'seg_sample', 'segmentation', and their format
  folder.py        builds an image dataset from a folder (data_prep/)
  sample_set.py    the built-in image sample sets

Importing the package registers the built-in sources.
"""

from visgen_jax.data import images  # registers its sources
from visgen_jax.data import image_folder  # registers its source
from visgen_jax.data import segmentation  # registers its sources
from visgen_jax.data import rig_subjects  # registers its source
from visgen_jax.data import rig_buffers  # registers its source
from visgen_jax.data.registry import validate
