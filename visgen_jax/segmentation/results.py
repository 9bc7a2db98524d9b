"""One image's segmentation as files (--mode=segment): overlay.png,
masks/<class>.png (semantic) and panoptic.png + panoptic.json (COCO panoptic),
written all or nothing from process 0."""

import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax import image_io
from visgen_jax.segmentation import postprocess


def resize_logits(masks, hw):
  """[M, h, w] mask logits bilinearly resized to hw = (H, W)."""
  if masks.shape[0] == 0:
    return np.zeros((0, *hw), np.float32)
  return np.asarray(jax.image.resize(jnp.asarray(masks), (masks.shape[0], *hw), 'linear'))


def write_segmentation(workdir, image_path, image, names, is_thing, logits, masks, options):
  """overlay.png, masks/<class>.png, panoptic.png + panoptic.json for one image, all or nothing,
  from process 0 only."""
  if not image_io.is_writer():
    return
  stem = os.path.splitext(os.path.basename(image_path))[0]
  out_root = os.path.join(workdir, 'segment')
  os.makedirs(out_root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{stem}-', dir=out_root)
  try:
    if len(logits):
      scores = postprocess.semantic_inference(logits, masks)
      semantic = scores.argmax(0)
      pan_map, segments = postprocess.panoptic_inference(
          logits, masks, is_thing, options.object_mask_threshold, options.overlap_threshold)
    else:  # no proposals: a defined empty result
      semantic, pan_map, segments = None, np.zeros(image.shape[:2], np.int32), []
    os.makedirs(os.path.join(tmp, 'masks'))
    if semantic is not None:
      for c in np.unique(semantic):
        image_io.save_png(os.path.join(tmp, 'masks', f'{_file_name(names[c])}.png'),
                          np.repeat(((semantic == c) * 255).astype(np.uint8)[..., None], 3, -1))
    image_io.save_png(os.path.join(tmp, 'overlay.png'), overlay(image, pan_map))
    categories = [{'id': i, 'name': n, 'isthing': int(t)} for i, (n, t) in enumerate(zip(names, is_thing))]
    entry = postprocess.write_coco_panoptic(os.path.join(tmp, 'panoptic.png'), pan_map, segments, stem)
    for segment, info in zip(entry['segments_info'], [s for s in segments if s['area']]):
      segment['score'] = info['score']
    postprocess.write_coco_panoptic_json(os.path.join(tmp, 'panoptic.json'), [entry], categories)
    os.chmod(tmp, 0o777 & ~image_io.umask())  # mkdtemp makes it private
    final = os.path.join(out_root, stem)
    if os.path.isdir(final):
      shutil.rmtree(final)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  names_found = sorted({names[s['category_id']] for s in segments})
  print(f'Wrote {final}: {len(segments)} segments ({", ".join(names_found) or "none"})', flush=True)


def _file_name(name: str) -> str:
  return ''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in name)


def overlay(image, panoptic_map, alpha: float = 0.5):
  """The image with every panoptic segment tinted by a fixed colour per id."""
  colours = np.random.default_rng(0).integers(40, 256, size=(int(panoptic_map.max()) + 1, 3))
  tinted = (1 - alpha) * image + alpha * colours[panoptic_map]
  return np.where(panoptic_map[..., None] > 0, tinted, image).astype(np.uint8)
