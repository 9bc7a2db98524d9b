"""Panoptic / semantic segmentation datasets, by concern:

  records.py  the record format and the proposals format (.npz), reading them
  writer.py   writing a dataset (data_prep/build_segmentation_dataset.py)
  sample.py   the built-in synthetic set 'seg_sample'
  source.py   the sources 'seg_sample' and 'segmentation': batches

The names other packages use are importable from here.
"""

from visgen_jax.data.segmentation.records import IGNORE_LABEL
from visgen_jax.data.segmentation.records import decode_example
from visgen_jax.data.segmentation.records import is_segmentation_dir
from visgen_jax.data.segmentation.records import load_proposals
from visgen_jax.data.segmentation.records import rgb_to_ids
from visgen_jax.data.segmentation.records import save_proposals
from visgen_jax.data.segmentation.records import semantic_map
from visgen_jax.data.segmentation.sample import SAMPLE_CATEGORIES
from visgen_jax.data.segmentation.sample import SAMPLE_NAME
from visgen_jax.data.segmentation.sample import SAMPLE_SIZE
from visgen_jax.data.segmentation.sample import sample_example
from visgen_jax.data.segmentation.source import MASK_LOGIT
from visgen_jax.data.segmentation.source import inference_example
from visgen_jax.data.segmentation.source import make_segmentation_iterator
from visgen_jax.data.segmentation.source import make_segmentation_source
from visgen_jax.data.segmentation.writer import Annotation
from visgen_jax.data.segmentation.writer import BuildReport
from visgen_jax.data.segmentation.writer import SourceItem
from visgen_jax.data.segmentation.writer import read_bytes
from visgen_jax.data.segmentation.writer import write_segmentation_dataset
