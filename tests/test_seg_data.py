"""Segmentation datasets: converters, record round trips, proposals, batches."""

import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from visgen_jax.data import pipeline
from visgen_jax.data import segmentation as seg
from visgen_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'data_prep', 'build_segmentation_dataset.py')
_spec = importlib.util.spec_from_file_location('build_segmentation_dataset',
                                               SCRIPT)
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


pytestmark = pytest.mark.usefixtures('private_cache')


def seg_config(**overrides):
  config = dict(name='seg_sample', path='', resolution=64, random_flip=False,
                scale_range=(1.0, 1.0), max_segments=8, max_proposals=6,
                proposals='auto', worker_count=0, prefetch=0)
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def records(path):
  source, info = seg.make_segmentation_source(
      seg_config(name='segmentation', path=str(path)))
  return [seg.decode_example(source[i]) for i in range(len(source))], info


def noise(rng, *shape):
  return rng.integers(0, 256, shape, dtype=np.uint8)


def save(array, path, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


# ------------------------------------------------------------ fake layouts


def fake_coco(root, rng):
  """COCO panoptic val: an RGB JPEG, a gray PNG, a corrupt JPEG, an image
  without annotation. Returns {file_name: (ids, segments_info)}."""
  ids_a = np.zeros((20, 30), np.int32)
  ids_a[:10] = 513  # sky; 513 = (1, 2, 0) in RGB: the G channel matters.
  ids_a[12:, :8] = 1  # person
  ids_a[12:, 20:] = 2  # crowd of people
  ids_b = np.full((24, 16), 7, np.int32)
  truth = {
      'a.jpg': (ids_a, [dict(id=1, category_id=1, iscrowd=0),
                        dict(id=2, category_id=1, iscrowd=1),
                        dict(id=513, category_id=187, iscrowd=0)]),
      'b.png': (ids_b, [dict(id=7, category_id=187, iscrowd=0)]),
      'c.jpg': (ids_b, [dict(id=7, category_id=187, iscrowd=0)]),
  }
  save(noise(rng, 20, 30, 3), f'{root}/val2017/a.jpg', quality=90)
  save(noise(rng, 24, 16), f'{root}/val2017/b.png')
  os.makedirs(f'{root}/val2017', exist_ok=True)
  with open(f'{root}/val2017/c.jpg', 'wb') as f:
    f.write(b'\xff\xd8 not really a jpeg')
  save(noise(rng, 8, 8, 3), f'{root}/val2017/d.jpg')
  images, annotations = [], []
  for k, (name, (ids, segments)) in enumerate(truth.items()):
    png = name.rsplit('.', 1)[0] + '.png'
    rgb = np.stack([ids & 255, (ids >> 8) & 255, ids >> 16], -1)
    save(rgb.astype(np.uint8), f'{root}/panoptic_val2017/{png}')
    images.append(dict(id=k, file_name=name, height=ids.shape[0],
                       width=ids.shape[1]))
    annotations.append(dict(image_id=k, file_name=png,
                            segments_info=segments))
  images.append(dict(id=9, file_name='d.jpg', height=8, width=8))
  meta = dict(images=images, annotations=annotations, categories=[
      dict(id=1, name='person', isthing=1, color=[220, 20, 60]),
      dict(id=187, name='sky-other-merged', isthing=0, color=[70, 130, 180])])
  os.makedirs(f'{root}/annotations', exist_ok=True)
  with open(f'{root}/annotations/panoptic_val2017.json', 'w') as f:
    json.dump(meta, f)
  return truth


def test_coco_panoptic_round_trip_and_bad_images(tmp_path):
  rng = np.random.default_rng(0)
  truth = fake_coco(tmp_path / 'coco', rng)
  out = tmp_path / 'ds'
  report = build.build_segmentation_dataset(
      'coco_panoptic', str(tmp_path), 'val', str(out))  # finds coco/ inside
  assert report.num_examples == 2 and report.num_segments == 4
  assert [name for name, _ in report.skipped] == ['d.jpg', 'c.jpg']
  assert 'image' in dict(report.skipped)['c.jpg']
  assert report.converted == [('b.png', 'PNG L')]
  assert 'c.jpg' in report.summary()

  examples, info = records(out)
  assert info.kind == 'panoptic' and info.split == 'val'
  assert info.class_names == ['person', 'sky-other-merged']
  assert [c['isthing'] for c in info.categories] == [True, False]
  assert [c['id'] for c in info.categories] == [1, 187]
  a, b = examples
  assert (a['image_id'], b['image_id']) == ('a', 'b')
  np.testing.assert_array_equal(a['ids'], truth['a.jpg'][0])
  np.testing.assert_array_equal(a['segment_ids'], [1, 2, 513])
  np.testing.assert_array_equal(a['segment_classes'], [0, 0, 1])
  np.testing.assert_array_equal(a['segment_iscrowd'], [False, True, False])
  np.testing.assert_array_equal(b['ids'], truth['b.png'][0])
  source, _ = seg.make_segmentation_source(
      seg_config(name='segmentation', path=str(out)))
  with open(tmp_path / 'coco/val2017/a.jpg', 'rb') as f:
    assert source[0]['image'] == f.read()  # RGB JPEG stored byte for byte
  gray = np.asarray(Image.open(tmp_path / 'coco/val2017/b.png'))
  np.testing.assert_array_equal(b['image'], np.stack([gray] * 3, -1))
  semantic = seg.semantic_map(a['ids'], a['segment_ids'],
                              a['segment_classes'])
  assert semantic[0, 0] == 1 and semantic[15, 0] == 0
  assert semantic[15, 25] == 0 and semantic[11, 0] == seg.IGNORE_LABEL
  with open(out / 'build_report.json') as f:
    assert len(json.load(f)['skipped']) == 2

  # Batches: crowd is never a target; with K = 1 the larger segment wins.
  for k, classes, sky in ((3, [0, 1, -1], 1), (1, [1], 0)):
    config = seg_config(name='segmentation', path=str(out), resolution=30,
                        max_segments=k)
    batch = next(seg.make_segmentation_iterator(config, local_batch_size=2,
                                                train=False))
    np.testing.assert_array_equal(batch['target_classes'][0], classes)
    np.testing.assert_array_equal(batch['target_masks'][0, sky, :20],
                                  a['ids'] == 513)


def object_info(root, n=150):
  rows = ['Idx,Ratio,Train,Val,Name'] + [
      f'{i},0.01,1,1,thing{i};alias' for i in range(n, 0, -1)]
  (root / 'objectInfo150.csv').write_text('\n'.join(rows) + '\n')


def test_ade20k_150_semantic_one_segment_per_class(tmp_path):
  rng = np.random.default_rng(1)
  root = tmp_path / 'ADEChallengeData2016'
  labels = {'x': rng.choice([0, 1, 5, 150], (12, 10)).astype(np.uint8),
            'y': np.full((6, 9), 0, np.uint8)}
  labels['y'][:2] = 42
  for stem, label in labels.items():
    save(noise(rng, *label.shape, 3),
         f'{root}/images/validation/{stem}.jpg')
    save(label, f'{root}/annotations/validation/{stem}.png')
  save(noise(rng, 5, 5, 3), f'{root}/images/validation/z.jpg')  # no label
  object_info(root)
  out = tmp_path / 'ds'
  report = build.build_segmentation_dataset('ade20k_150', str(root), 'val',
                                            str(out))
  assert report.num_examples == 2
  assert report.skipped[0][0] == 'z.jpg'
  assert 'no label map' in report.skipped[0][1]
  (x, y), info = records(out)
  assert info.kind == 'semantic' and len(info.categories) == 150
  assert info.categories[0] == {'id': 1, 'name': 'thing1;alias',
                                'isthing': False,
                                'color': info.categories[0]['color']}
  for example, label in ((x, labels['x']), (y, labels['y'])):
    np.testing.assert_array_equal(example['ids'], label)  # id = class + 1
    present = sorted(set(label.ravel().tolist()) - {0})
    np.testing.assert_array_equal(example['segment_ids'], present)
    np.testing.assert_array_equal(example['segment_classes'],
                                  np.array(present) - 1)
    assert not example['segment_iscrowd'].any()


@pytest.mark.parametrize('classes', [59, 459])
def test_pascal_context_maps_and_void(tmp_path, classes):
  rng = np.random.default_rng(2)
  root = tmp_path / 'VOCdevkit' / 'VOC2010'
  if classes == 59:
    label = rng.choice([0, 3, 58, 255], (10, 14)).astype(np.uint8)
    ext, void = 'png', 255
    (root / 'JPEGImages').mkdir(parents=True)
    (root / '59_labels.txt').write_text(
        ''.join(f'{i}: name{i}\n' for i in range(1, 60)))
  else:
    label = rng.choice([0, 300, 458, 459, 65535], (10, 14)).astype(np.uint16)
    ext, void = 'tif', (459, 65535)
    (root / 'JPEGImages').mkdir(parents=True)
    (root / 'labels.txt').write_text(
        ''.join(f'{i}: name{i}\n' for i in range(1, 460)))
  save(label, f'{root}/annotations_detectron2/pc{classes}_val/a.{ext}')
  save(label, f'{root}/annotations_detectron2/pc{classes}_val/b.{ext}')
  save(noise(rng, 10, 14, 3), f'{root}/JPEGImages/a.jpg')
  save(noise(rng, 10, 14, 3), f'{root}/JPEGImages/unlabelled.jpg')
  out = tmp_path / 'ds'
  report = build.build_segmentation_dataset(
      f'pascal_context_{classes}', str(tmp_path), 'val', str(out))
  assert report.num_examples == 1
  assert report.skipped == [(f'b.{ext}', f'no image b.* in '
                             f'{root}/JPEGImages')]
  (a,), info = records(out)
  assert len(info.categories) == classes
  assert info.categories[0]['name'] == 'name1'
  valid = ~np.isin(label, void)
  np.testing.assert_array_equal(a['ids'], np.where(valid, label + 1, 0))
  np.testing.assert_array_equal(
      a['segment_classes'], sorted(set(label[valid].tolist())))


def test_categories_file_and_missing_name_lists(tmp_path):
  rng = np.random.default_rng(3)
  root = tmp_path / 'ADE20K_2021_17_01'
  save(rng.choice([0, 846, 65535], (6, 6)).astype(np.uint16),
       f'{root}/annotations_detectron2/validation/p.tif')
  save(noise(rng, 6, 6, 3), f'{root}/images_detectron2/validation/p.jpg')
  with pytest.raises(UserError, match='847 class names'):
    build.build_segmentation_dataset('ade20k_847', str(tmp_path), 'val',
                                     str(tmp_path / 'out'))
  names = tmp_path / 'names.json'
  names.write_text(json.dumps(['a'] * 846 + [{'name': 'z', 'isthing': 1}]))
  build.build_segmentation_dataset('ade20k_847', str(tmp_path), 'val',
                                   str(tmp_path / 'out'),
                                   categories=str(names))
  (p,), info = records(tmp_path / 'out')
  assert info.categories[846] == {'id': 846, 'name': 'z', 'isthing': True,
                                  'color': info.categories[846]['color']}
  np.testing.assert_array_equal(p['segment_classes'], [0, 846])
  short = tmp_path / 'short.txt'
  short.write_text('a\nb\n')
  with pytest.raises(UserError, match='lists 2 classes; this format has 847'):
    build.build_segmentation_dataset('ade20k_847', str(tmp_path), 'val',
                                     str(tmp_path / 'o2'),
                                     categories=str(short))
  (tmp_path / 'ADEChallengeData2016/images/training').mkdir(parents=True)
  (tmp_path / 'ADEChallengeData2016/annotations/training').mkdir(parents=True)
  with pytest.raises(UserError, match='objectInfo150'):
    build.build_segmentation_dataset('ade20k_150', str(tmp_path), 'train',
                                     str(tmp_path / 'o3'))
  assert not os.path.exists(tmp_path / 'o2')
  assert not os.path.exists(tmp_path / 'o3')


def test_wrong_layout_exits_2_with_one_sentence_and_writes_nothing(
    tmp_path, capsys):
  (tmp_path / 'coco' / 'annotations').mkdir(parents=True)
  out = tmp_path / 'out'
  code = build.main(['--format=coco_panoptic', f'--src={tmp_path}',
                     '--split=train', f'--out={out}'])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert err.count('\n') == 0 and err.startswith('error: ')
  assert 'panoptic_train2017.json' in err and err.endswith('.')
  assert sorted(os.listdir(tmp_path)) == ['coco']
  # The script itself, as a user runs it.
  result = subprocess.run(
      [sys.executable, SCRIPT, '--format=ade20k_150', f'--src={tmp_path}',
       '--split=val', f'--out={out}'], capture_output=True, text=True,
      check=False)
  assert result.returncode == 2
  assert result.stderr.strip().startswith('error: src: ')
  assert 'images/validation' in result.stderr
  assert sorted(os.listdir(tmp_path)) == ['coco']


# --------------------------------------------------------------- proposals


def test_load_proposals_validates(tmp_path):
  path = str(tmp_path / 'p.npz')
  seg.save_proposals(path, np.zeros((3, 4, 5), bool), [0.1, 0.9, 0.5])
  with pytest.raises(UserError, match=r'p.npz.*4x5.*image is 5x4'):
    seg.load_proposals(path, (5, 4))
  masks, scores = seg.load_proposals(path, (4, 5))
  assert masks.shape == (3, 4, 5) and masks.dtype == bool
  np.testing.assert_allclose(scores, [0.1, 0.9, 0.5])

  seg.save_proposals(path, np.zeros((0, 4, 5), np.float16))
  masks, scores = seg.load_proposals(path, (4, 5))
  assert masks.shape == (0, 4, 5) and scores is None

  seg.save_proposals(path, np.full((1, 2, 2), 255, np.uint8))
  assert seg.load_proposals(path, (2, 2)).masks.all()
  logits = np.array([[[np.nan, 0], [0, 0]]], np.float32)
  for bad, match in ((np.zeros((2, 2)), r'expected \[M, H, W\]'),
                     (logits, 'not all finite'),
                     (np.zeros((1, 2, 2), np.int32), 'int32')):
    seg.save_proposals(path, bad)
    with pytest.raises(UserError, match=match):
      seg.load_proposals(path, (2, 2))
  seg.save_proposals(path, np.zeros((2, 2, 2), bool), [1.0])
  with pytest.raises(UserError, match='one per mask'):
    seg.load_proposals(path, (2, 2))
  np.savez(path, boxes=np.zeros(3))
  with pytest.raises(UserError, match='no "masks" array'):
    seg.load_proposals(path, (2, 2))
  (tmp_path / 'junk.npz').write_bytes(b'junk')
  with pytest.raises(UserError, match='not a readable .npz'):
    seg.load_proposals(str(tmp_path / 'junk.npz'), (2, 2))
  with pytest.raises(UserError, match='no file'):
    seg.load_proposals(str(tmp_path / 'absent.npz'), (2, 2))


def fake_ade(root, rng, shapes):
  for stem, (h, w) in shapes.items():
    label = np.zeros((h, w), np.uint8)
    label[: h // 2] = 1
    label[h // 2:, : w // 2] = 2
    save(noise(rng, h, w, 3), f'{root}/images/validation/{stem}.jpg')
    save(label, f'{root}/annotations/validation/{stem}.png')
  object_info(root)


def test_build_with_proposals_and_stored_proposal_batches(tmp_path):
  rng = np.random.default_rng(4)
  root = tmp_path / 'ADEChallengeData2016'
  fake_ade(root, rng, {'q': (16, 24), 'r': (12, 12)})
  props = tmp_path / 'proposals'
  props.mkdir()
  q_masks = rng.random((4, 16, 24)) > 0.5
  seg.save_proposals(str(props / 'q.npz'), q_masks, [0.2, 0.9, 0.1, 0.5])
  out = str(tmp_path / 'ds')

  with pytest.raises(UserError, match=r'no r.npz .*1 of 2 images'):
    build.build_segmentation_dataset('ade20k_150', str(root), 'val', out,
                                     proposals=str(props))
  seg.save_proposals(str(props / 'r.npz'), np.zeros((2, 12, 13), bool))
  with pytest.raises(UserError, match=r'r.npz.*12x13.*image is 12x12'):
    build.build_segmentation_dataset('ade20k_150', str(root), 'val', out,
                                     proposals=str(props))
  assert sorted(os.listdir(tmp_path)) == ['ADEChallengeData2016',
                                          'proposals']
  seg.save_proposals(str(props / 'r.npz'), np.zeros((0, 12, 12), bool))
  build.build_segmentation_dataset('ade20k_150', str(root), 'val', out,
                                   proposals=str(props))
  (q, r), info = records(out)
  assert info.has_proposals
  np.testing.assert_array_equal(q['proposals'].masks, q_masks)
  assert r['proposals'].masks.shape == (0, 12, 12)

  # Eval at S = 24: q keeps its size; the 3 best-scored of 4 proposals.
  config = seg_config(name='segmentation', path=out, resolution=24,
                      max_proposals=3, proposals='stored')
  (batch,) = list(seg.make_segmentation_iterator(
      config, local_batch_size=2, train=False))
  expected = np.where(q_masks[[1, 3, 0]], seg.MASK_LOGIT, -seg.MASK_LOGIT)
  np.testing.assert_array_equal(batch['proposals'][0, :, :16], expected)
  assert (batch['proposals'][0, :, 16:] == -seg.MASK_LOGIT).all()
  np.testing.assert_allclose(batch['proposal_scores'][0], [0.9, 0.5, 0.2])
  assert batch['proposal_valid'][0].all()
  # r has no proposals: all rows are empty padding.
  assert not batch['proposal_valid'][1].any()
  assert (batch['proposals'][1] == -seg.MASK_LOGIT).all()
  assert (batch['proposal_scores'][1] == 0).all()
  np.testing.assert_array_equal(batch['valid_hw'], [[16, 24], [24, 24]])
  np.testing.assert_array_equal(batch['orig_hw'], [[16, 24], [12, 12]])

  with pytest.raises(UserError, match='data.proposals'):
    seg.make_segmentation_iterator(
        seg_config(name='seg_sample', proposals='stored'), local_batch_size=2)


# ------------------------------------------------------------------ batches


def test_sample_set_is_deterministic_and_complete():
  a, b = seg.sample_example(5), seg.sample_example(5)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  source, info = seg.make_segmentation_source(seg_config())
  assert info.num_examples == seg.SAMPLE_SIZE
  assert info.class_names == ['circle', 'square', 'triangle', 'sky', 'grass',
                              'water', 'sand']
  example = seg.decode_example(source[5])
  np.testing.assert_array_equal(example['image'], a[0])
  np.testing.assert_array_equal(example['ids'], a[1])
  assert [tuple(s) for s in zip(example['segment_ids'].tolist(),
                                example['segment_classes'].tolist(),
                                example['segment_iscrowd'].tolist())] == a[2]


def test_eval_batches_resize_pad_and_match_the_records():
  config = seg_config(resolution=128, max_segments=6, max_proposals=4)
  source, _ = seg.make_segmentation_source(config)
  it = seg.make_segmentation_iterator(config, local_batch_size=5,
                                      train=False, process_index=1,
                                      process_count=2)
  batch = next(it)
  expected = pipeline.example_batch(config, 5)
  assert set(batch) == set(expected)
  for key, value in expected.items():
    assert batch[key].shape == value.shape and batch[key].dtype == value.dtype
  np.testing.assert_array_equal(batch['index'], [1, 3, 5, 7, 9])
  for b, index in enumerate(batch['index']):
    example = seg.decode_example(source[int(index)])
    # 96 x 128 at S = 128: no resize, 32 rows of padding at the bottom.
    image = np.round((batch['image'][b, :96] + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(image, example['image'])
    assert (batch['image'][b, 96:] == 0).all()
    n = len(example['segment_ids'])
    assert batch['target_valid'][b].tolist() == [True] * n + [False] * (6 - n)
    np.testing.assert_array_equal(batch['target_classes'][b, :n],
                                  example['segment_classes'])
    assert (batch['target_classes'][b, n:] == -1).all()
    for i, sid in enumerate(example['segment_ids']):
      np.testing.assert_array_equal(batch['target_masks'][b, i, :96],
                                    example['ids'] == sid)
    assert not batch['target_masks'][b, :, 96:].any()
    assert not batch['target_masks'][b, n:].any()
    # Ground-truth mode: proposal i is target i as +-MASK_LOGIT.
    m = min(n, 4)
    np.testing.assert_array_equal(
        batch['proposals'][b, :m],
        np.where(batch['target_masks'][b, :m], seg.MASK_LOGIT,
                 -seg.MASK_LOGIT))
    assert (batch['proposals'][b, m:] == -seg.MASK_LOGIT).all()
    assert batch['proposal_valid'][b].tolist() == [True] * m + [False] * (
        4 - m)


def test_train_batches_crop_flip_and_keep_the_largest_segments():
  config = seg_config(resolution=96, random_flip=True, max_segments=2)
  source, _ = seg.make_segmentation_source(config)
  it = seg.make_segmentation_iterator(config, local_batch_size=8, seed=1)
  flips = 0
  for _ in range(2):
    batch = next(it)
    np.testing.assert_array_equal(batch['valid_hw'], [[96, 96]] * 8)
    for b, index in enumerate(batch['index']):
      example = seg.decode_example(source[int(index)])
      image = np.round((batch['image'][b] + 1) * 127.5).astype(np.uint8)
      # Shorter side 96 already: a 96 x 96 crop of 96 x 128, maybe flipped.
      matches = []
      for left in range(33):
        for flip in (False, True):
          crop = example['image'][:, left:left + 96]
          crop = crop[:, ::-1] if flip else crop
          if np.array_equal(image, crop):
            matches.append((left, flip))
      assert matches
      left, flip = matches[0]
      flips += flip
      ids = example['ids'][:, left:left + 96]
      ids = ids[:, ::-1] if flip else ids
      visible, counts = np.unique(ids, return_counts=True)
      area = dict(zip(visible.tolist(), counts.tolist()))
      largest = sorted(example['segment_ids'].tolist(),
                       key=lambda s: -area.get(s, 0))[:2]
      kept = [s for s in example['segment_ids'].tolist() if s in largest]
      for i, sid in enumerate(kept):
        np.testing.assert_array_equal(batch['target_masks'][b, i], ids == sid)
      assert batch['target_valid'][b].all()
  assert 0 < flips < 16


def test_train_stream_splits_over_processes_and_resumes_exactly():
  config = seg_config(resolution=32, random_flip=True, scale_range=(0.8, 1.5))
  make = lambda b, index, count: seg.make_segmentation_iterator(
      config, local_batch_size=b, seed=3, process_index=index,
      process_count=count)
  single = [next(make(4, 0, 1)) for _ in range(1)]
  parts = [next(make(2, p, 2)) for p in range(2)]
  for key in single[0]:
    np.testing.assert_array_equal(
        np.concatenate([parts[0][key], parts[1][key]]), single[0][key])

  reference = make(2, 1, 2)
  expected = [next(reference) for _ in range(5)]
  interrupted = make(2, 1, 2)
  for _ in range(2):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))
  resumed = make(2, 1, 2)
  resumed.set_state(state)
  for want in expected[2:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(UserError, match='data iterator'):
    seg.make_segmentation_iterator(
        seg_config(resolution=32, random_flip=True, scale_range=(0.8, 1.5),
                   max_segments=9), local_batch_size=2, seed=3,
        process_index=1, process_count=2).set_state(state)


def test_config_errors_name_the_key(tmp_path):
  cases = [(dict(resolution=(32, 48)), 'data.resolution'),
           (dict(scale_range=(2.0, 1.0)), 'data.scale_range'),
           (dict(max_segments=0), 'data.max_segments'),
           (dict(proposals='maybe'), 'data.proposals'),
           (dict(name='coco'), 'data.name'),
           (dict(name='segmentation'), 'data.path: empty'),
           (dict(name='segmentation', path=str(tmp_path)),
            'no segmentation dataset')]
  for overrides, match in cases:
    with pytest.raises(UserError, match=match):
      seg.make_segmentation_iterator(seg_config(**overrides),
                                     local_batch_size=2)


def test_worker_processes_give_the_same_batches():
  make = lambda workers: seg.make_segmentation_iterator(
      seg_config(resolution=32, random_flip=True, worker_count=workers,
                 prefetch=2), local_batch_size=4, seed=5)
  with make(0) as plain, make(1) as workers:
    for _ in range(2):
      a, b = next(plain), next(workers)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
