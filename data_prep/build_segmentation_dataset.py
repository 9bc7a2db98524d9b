"""Convert a segmentation dataset from its official local layout to ArrayRecord.

  python data_prep/build_segmentation_dataset.py --format=coco_panoptic \
      --src=datasets/coco --split=val --out=DIR [--proposals=DIR]
  python data_prep/build_segmentation_dataset.py --format=ade20k_150 \
      --src=datasets/ADEChallengeData2016 --split=val --out=DIR
  python data_prep/build_segmentation_dataset.py --format=ade20k_847 \
      --src=datasets/ADE20K_2021_17_01 --split=val --out=DIR \
      --categories=ade847_names.txt
  python data_prep/build_segmentation_dataset.py --format=pascal_context_59 \
      --src=datasets/VOCdevkit/VOC2010 --split=val --out=DIR

The record format, the category table and the proposals format are described
in `visgen_jax/data/segmentation/records.py`. `--src` may also be the folder
that holds the dataset's top directory (coco/, ADEChallengeData2016/,
ADE20K_2021_17_01/, VOCdevkit/VOC2010/). What is read, exactly:

coco_panoptic (133 classes: 80 things, 53 stuff)
  annotations/panoptic_{split}2017.json (or panoptic_{split}2017.json at the
  top), the panoptic PNGs in panoptic_{split}2017/ (or annotations/
  panoptic_{split}2017/) and the images in {split}2017/. Categories (id, name,
  isthing, color) come from the JSON, in its order; crowd flags are kept.
  Images the JSON lists without an annotation are skipped and reported.

ade20k_150 (ADE20K SceneParsing, ADEChallengeData2016)
  images/{training,validation}/*.jpg and annotations/{training,validation}/
  *.png: 8-bit maps, 0 = "other" (void), 1..150 = classes 0..149. Names: the
  Name column of the release's objectInfo150.txt (tab separated) or
  objectInfo150.csv (comma separated), as written there; or --categories.

ade20k_847 (full ADE20K, 847 classes)
  The official ADE20K_2021_17_01 release stores per-object polygons and a
  pickled index, not class maps; the open-vocabulary segmentation works
  (MaskFormer's prepare_ade20k_full_sem_seg.py, used by MaskCLIP) first turn
  it into images_detectron2/{training,validation}/*.jpg and
  annotations_detectron2/{training,validation}/*.tif: 16-bit maps of class
  ids 0..846 with 65535 = void. That prepared layout is what is read (.png
  16-bit maps are accepted too). The release has no file of the 847 names in
  this order, so --categories is required.

pascal_context_59 / pascal_context_459 (PASCAL Context on VOC2010)
  JPEGImages/*.jpg with the maps of the detectron2-style prepare script (the
  one the open-vocabulary works share), one image per map:
  annotations_detectron2/pc59_{split}/*.png (8-bit, classes 0..58, 255 =
  void) or annotations_detectron2/pc459_{split}/*.tif (16-bit, classes
  0..458; anything else void). That script converts the official
  trainval/*.mat files (LabelMap) with labels.txt and 59_labels.txt and, as
  published, writes only the val split. Names: 59_labels.txt (59 names in
  class order, "index: name" or "name" per line) or labels.txt ("index:
  name", indices 1..459) in VOC2010/, or --categories.

--categories=FILE: one name per line in class order, or a JSON list of names
or of {"name", "isthing", "color", "id"} objects (isthing defaults to false:
semantic sources carry no thing/stuff split). Not used for coco_panoptic.

--proposals=DIR: one <image_id>.npz per image (the image file name without
its extension), stored with the records; see the module named above.

Unreadable or mismatched images are skipped and reported; a wrong layout, a
missing name list or a bad proposals file is one sentence on stderr and exit
code 2, with nothing written. The dataset is built in a hidden temporary
directory and renamed into place when complete.
"""

import csv
import dataclasses
import functools
import io
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

# Runnable from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from visgen_jax.data import folder  # pylint: disable=g-import-not-at-top
from visgen_jax.data import segmentation as seg  # pylint: disable=g-import-not-at-top
from visgen_jax.errors import UserError  # pylint: disable=g-import-not-at-top

SPLITS = ('train', 'val')
ADE_SPLITS = {'train': 'training', 'val': 'validation'}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


@dataclasses.dataclass(frozen=True)
class Layout:
  """A source read: its images, categories and kind."""
  items: list
  categories: list
  kind: str  # panoptic | semantic
  root: str
  # (name, why) of source files left out before reading: no image, or an
  # image without an annotation.
  unpaired: list


def _descend(src: str, *names: str) -> str:
  """`src`, or the dataset's top directory inside it if it is there."""
  for name in names:
    if os.path.isdir(os.path.join(src, name)):
      return os.path.join(src, name)
  return src


def _first_existing(*paths: str) -> str:
  for path in paths:
    if os.path.exists(path):
      return path
  raise UserError(f'src: {paths[0]!r} does not exist; check --src, --format '
                  'and --split.')


def _files(directory: str, extensions) -> list[str]:
  return sorted(n for n in os.listdir(directory)
                if n.lower().endswith(extensions) and not n.startswith('.'))


# ------------------------------------------------------------- categories


def read_categories_file(path: str) -> list[dict]:
  """Category dicts from a names file (one per line) or a JSON list."""
  if not os.path.isfile(path):
    raise UserError(f'categories: {path!r} is not a file.')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  if path.lower().endswith('.json'):
    try:
      entries = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserError(f'categories: {path!r} is not valid JSON ({e.msg}, '
                      f'line {e.lineno}).') from None
    if not isinstance(entries, list):
      raise UserError(f'categories: {path!r} must hold a JSON list.')
    return [e if isinstance(e, dict) else {'name': e} for e in entries]
  return [{'name': line.strip()} for line in text.splitlines()
          if line.strip()]


def _check_count(categories, expected: int, where: str) -> list:
  if len(categories) != expected:
    raise UserError(f'categories: {where} lists {len(categories)} classes; '
                    f'this format has {expected}.')
  return categories


def _object_info_150(root: str) -> list[dict]:
  """Names (by Idx 1..150) from objectInfo150.txt / .csv of the release."""
  for name, delimiter in (('objectInfo150.txt', '\t'),
                          ('objectInfo150.csv', ',')):
    path = os.path.join(root, name)
    if os.path.isfile(path):
      break
  else:
    raise UserError(f'categories: no {os.path.join(root, "objectInfo150.txt")}'
                    ' or objectInfo150.csv (from the ADEChallengeData2016 '
                    'release); pass --categories=FILE instead.')
  with open(path, encoding='utf-8', newline='') as f:
    rows = list(csv.DictReader(f, delimiter=delimiter))
  try:
    table = sorted((int(r['Idx']), r['Name'].strip()) for r in rows)
  except (KeyError, ValueError, AttributeError):
    raise UserError(f'categories: {path!r} has no Idx and Name columns.'
                    ) from None
  if [i for i, _ in table] != list(range(1, 151)):
    raise UserError(f'categories: {path!r} does not list Idx 1..150.')
  return [{'id': i, 'name': n} for i, n in table]


def _context_names(root: str, classes: int) -> list[dict]:
  """PASCAL Context names from 59_labels.txt or labels.txt in VOC2010/."""
  if classes == 59:
    path = os.path.join(root, '59_labels.txt')
  else:
    path = os.path.join(root, 'labels.txt')
  if not os.path.isfile(path):
    raise UserError(f'categories: no {path!r} (the PASCAL Context label '
                    'list); pass --categories=FILE instead.')
  with open(path, encoding='utf-8') as f:
    lines = [line.strip() for line in f if line.strip()]
  if classes == 59:
    names = [line.rsplit(':', 1)[-1].strip() for line in lines]
    return _check_count([{'name': n} for n in names], 59, repr(path))
  table = {}
  for line in lines:
    index, _, name = line.partition(':')
    try:
      table[int(index)] = name.strip()
    except ValueError:
      raise UserError(f'categories: {path!r} has a line {line!r}; expected '
                      '"index: name".') from None
  if [i for i in sorted(table) if i > 0] != list(range(1, 460)):
    raise UserError(f'categories: {path!r} does not list indices 1..459.')
  return [{'id': i, 'name': table[i]} for i in range(1, 460)]


# ---------------------------------------------------------------- layouts


def _coco_annotation(png_path: str, segments: list) -> seg.Annotation:
  data = seg.read_bytes(png_path)
  with Image.open(io.BytesIO(data)) as img:
    if img.mode != 'RGB':
      raise ValueError(f'panoptic PNG is mode {img.mode}, expected RGB')
    ids = seg.rgb_to_ids(np.asarray(img))
  return seg.Annotation(ids, segments, data)


def coco_panoptic(src: str, split: str, categories_file) -> Layout:
  if categories_file:
    raise UserError('categories: --categories is not used with coco_panoptic '
                    '(the names come from the panoptic JSON).')
  root = _descend(src, 'coco')
  name = f'panoptic_{split}2017'
  json_path = _first_existing(
      os.path.join(root, 'annotations', f'{name}.json'),
      os.path.join(root, f'{name}.json'))
  png_dir = _first_existing(os.path.join(root, name),
                            os.path.join(root, 'annotations', name))
  image_dir = _first_existing(os.path.join(root, f'{split}2017'))
  try:
    with open(json_path, encoding='utf-8') as f:
      meta = json.load(f)
    images = {im['id']: im['file_name'] for im in meta['images']}
    categories = [{'id': c['id'], 'name': c['name'],
                   'isthing': bool(c['isthing']),
                   **({'color': c['color']} if 'color' in c else {})}
                  for c in meta['categories']]
    annotations = meta['annotations']
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserError(f'src: {json_path!r} is not a COCO panoptic JSON '
                    f'({type(e).__name__}: {e}).') from None
  index = {c['id']: i for i, c in enumerate(categories)}
  items, annotated = [], set()

  def annotation(ann):
    segments = []
    for s in ann['segments_info']:
      if s['category_id'] not in index:
        raise ValueError(f'unknown category_id {s["category_id"]}')
      segments.append((s['id'], index[s['category_id']],
                       bool(s.get('iscrowd', 0))))
    return _coco_annotation(os.path.join(png_dir, ann['file_name']),
                            segments)

  for ann in sorted(annotations, key=lambda a: images.get(a['image_id'], '')):
    file_name = images.get(ann['image_id'])
    if file_name is None:
      continue
    annotated.add(ann['image_id'])
    items.append(seg.SourceItem(
        image_id=os.path.splitext(file_name)[0], name=file_name,
        image=functools.partial(seg.read_bytes,
                                os.path.join(image_dir, file_name)),
        annotation=functools.partial(annotation, ann)))
  unannotated = [(f, 'no panoptic annotation')
                 for i, f in sorted(images.items()) if i not in annotated]
  return Layout(items, categories, 'panoptic', root, unannotated)


def _semantic_annotation(path: str, num_classes: int,
                         offset: int) -> seg.Annotation:
  """Class map -> one segment per present class (id = class + 1)."""
  with Image.open(path) as img:
    if img.mode not in ('L', 'P', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N'):
      raise ValueError(f'label map is mode {img.mode}; expected one channel '
                       'of class ids')
    labels = np.asarray(img).astype(np.int64) - offset
  valid = (labels >= 0) & (labels < num_classes)
  present = np.unique(labels[valid]).tolist()
  ids = np.where(valid, labels + 1, 0).astype(np.int32)
  return seg.Annotation(ids, [(c + 1, c, False) for c in present])


def _semantic_items(image_dir: str, label_dir: str, label_exts, num_classes,
                    offset, by_label: bool):
  """Pairs images and label maps by file stem.

  by_label: walk the label maps (PASCAL Context: JPEGImages holds every
  VOC2010 image), else the images (ADE20K).
  """
  if by_label:
    stems = [os.path.splitext(n)[0] for n in _files(label_dir, label_exts)]
    images = {os.path.splitext(n)[0]: n
              for n in _files(image_dir, IMAGE_EXTENSIONS)}
  else:
    names = _files(image_dir, IMAGE_EXTENSIONS)
    stems = [os.path.splitext(n)[0] for n in names]
    images = dict(zip(stems, names))
  labels = {os.path.splitext(n)[0]: n for n in _files(label_dir, label_exts)}
  items, missing = [], []

  def label_map(stem):
    if stem not in labels:
      raise FileNotFoundError(f'no label map {stem}.* in {label_dir}')
    return _semantic_annotation(os.path.join(label_dir, labels[stem]),
                                num_classes, offset)

  for stem in stems:
    if stem not in images:
      missing.append((labels[stem], f'no image {stem}.* in {image_dir}'))
      continue
    items.append(seg.SourceItem(
        image_id=stem, name=images[stem],
        image=functools.partial(seg.read_bytes,
                                os.path.join(image_dir, images[stem])),
        annotation=functools.partial(label_map, stem)))
  return items, missing


def _semantic_categories(categories_file, default, expected: int):
  if categories_file:
    categories = read_categories_file(categories_file)
    return _check_count(categories, expected, repr(categories_file))
  return default()


def ade20k_150(src: str, split: str, categories_file) -> Layout:
  root = _descend(src, 'ADEChallengeData2016')
  part = ADE_SPLITS[split]
  image_dir = _first_existing(os.path.join(root, 'images', part))
  label_dir = _first_existing(os.path.join(root, 'annotations', part))
  categories = _semantic_categories(
      categories_file, lambda: _object_info_150(root), 150)
  items, missing = _semantic_items(image_dir, label_dir, ('.png',), 150,
                                   offset=1, by_label=False)
  return Layout(items, categories, 'semantic', root, missing)


def ade20k_847(src: str, split: str, categories_file) -> Layout:
  root = _descend(src, 'ADE20K_2021_17_01')
  part = ADE_SPLITS[split]
  image_dir = _first_existing(os.path.join(root, 'images_detectron2', part))
  label_dir = _first_existing(
      os.path.join(root, 'annotations_detectron2', part))

  def required():
    raise UserError('categories: ade20k_847 needs the 847 class names in '
                    'class-id order; pass --categories=FILE (one per line).')

  categories = _semantic_categories(categories_file, required, 847)
  items, missing = _semantic_items(image_dir, label_dir, ('.tif', '.tiff',
                                                          '.png'), 847,
                                   offset=0, by_label=False)
  return Layout(items, categories, 'semantic', root, missing)


def _pascal_context(classes: int):
  def layout(src: str, split: str, categories_file) -> Layout:
    root = _descend(src, os.path.join('VOCdevkit', 'VOC2010'), 'VOC2010')
    image_dir = _first_existing(os.path.join(root, 'JPEGImages'))
    label_dir = _first_existing(os.path.join(
        root, 'annotations_detectron2', f'pc{classes}_{split}'))
    categories = _semantic_categories(
        categories_file, lambda: _context_names(root, classes), classes)
    exts = ('.png',) if classes == 59 else ('.tif', '.tiff', '.png')
    items, missing = _semantic_items(image_dir, label_dir, exts, classes,
                                     offset=0, by_label=True)
    return Layout(items, categories, 'semantic', root, missing)
  return layout


FORMATS = {
    'coco_panoptic': coco_panoptic,
    'ade20k_150': ade20k_150,
    'ade20k_847': ade20k_847,
    'pascal_context_59': _pascal_context(59),
    'pascal_context_459': _pascal_context(459),
}


def build_segmentation_dataset(fmt: str, src: str, split: str, out: str, *,
                               proposals: str | None = None,
                               categories: str | None = None,
                               progress: bool = False) -> seg.BuildReport:
  """Reads `src` in layout `fmt` and writes the dataset `out` (see above)."""
  if fmt not in FORMATS:
    raise UserError(f'format: {fmt!r} is not one of {", ".join(FORMATS)}.')
  if split not in SPLITS:
    raise UserError(f'split: {split!r} is not one of {", ".join(SPLITS)}.')
  src, out = os.path.abspath(src), os.path.abspath(out)
  if not os.path.isdir(src):
    raise UserError(f'src: {src!r} is not a directory.')
  folder.check_new_out_dir(out)
  layout = FORMATS[fmt](src, split, categories)
  return seg.write_segmentation_dataset(
      out, layout.items, layout.categories, dataset=fmt, split=split,
      kind=layout.kind, proposals_dir=proposals, progress=progress,
      source=layout.root, skipped=layout.unpaired)


def main(argv: Sequence[str]) -> int:
  """Command line: see the module docstring; returns the exit code."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      description='Convert a segmentation dataset to ArrayRecord.')
  parser.add_argument('--format', required=True, choices=list(FORMATS))
  parser.add_argument('--src', required=True, help='the dataset folder')
  parser.add_argument('--split', required=True, choices=SPLITS)
  parser.add_argument('--out', required=True, help='new dataset directory')
  parser.add_argument('--proposals', default=None,
                      help='folder of <image_id>.npz mask proposals')
  parser.add_argument('--categories', default=None,
                      help='class names: one per line, or a JSON list')
  args = parser.parse_args(argv)
  try:
    report = build_segmentation_dataset(
        args.format, args.src, args.split, args.out,
        proposals=args.proposals, categories=args.categories, progress=True)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(report.summary())
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
