"""FID: the Inception vs pytorch-fid on shared random weights, its converter, the metrics vs
direct numpy formulas, feature extraction, the command and the evaluator.

Parity tolerance: max |flax − torch| ≤ 1e-4 over each output (activations are near unit scale:
see visgen_jax.bench.oracles.fid_inception_torch).
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from visgen_jax.bench import oracles
from visgen_jax.convert import inception as inception_convert
from visgen_jax.errors import UserError
from visgen_jax.fid import features, inputs, metrics
from visgen_jax.models.inception import InceptionV3
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def oracle():
  """(pytorch-fid's InceptionV3 with random weights, its state dict as numpy)."""
  pytest.importorskip('torch')
  pytest.importorskip('pytorch_fid')
  model, state_dict = oracles.fid_inception_torch(seed=0)
  return model, {k: v.numpy() for k, v in state_dict.items()}


def test_features_logits_and_spatial_match_pytorch_fid(oracle):
  import torch
  model, state_dict = oracle
  params = inception_convert.convert_inception_state_dict(state_dict)
  images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  mixed_6d = model.blocks[2][6]  # block 2 runs Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, ...
  captured = {}
  mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.update(out=out))
  with torch.no_grad():
    pool = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))[0][:, :, 0, 0]
  fc_weight, fc_bias = state_dict['fc.weight'], state_dict['fc.bias']
  reference = {'pool': pool.numpy(), 'logits': pool.numpy() @ fc_weight.T + fc_bias,
               'logits_unbiased': pool.numpy() @ fc_weight.T,
               'spatial': captured['out'].numpy().transpose(0, 2, 3, 1)[..., :7].reshape(2, -1)}
  out = jax.jit(InceptionV3().apply)({'params': params}, images)
  for name, expected in reference.items():
    assert out[name].shape == expected.shape, name
    np.testing.assert_allclose(out[name], expected, rtol=0, atol=1e-4, err_msg=name)
  assert reference['spatial'].shape == (2, 17 * 17 * 7)
  assert np.abs(reference['pool']).max() > 1  # the weights keep the signal: not a 0 == 0 check


def test_converter_names_every_key_it_cannot_map(oracle):
  _, state_dict = oracle
  # torchvision's ImageNet InceptionV3 instead: an auxiliary head and 1000 classes.
  other = dict(state_dict, **{'AuxLogits.fc.weight': np.zeros((1000, 768), np.float32),
                              'fc.weight': np.zeros((1000, 2048), np.float32)})
  del other['Mixed_7c.branch_pool.bn.running_var']
  with pytest.raises(UserError, match=r'^the state dict is not the FID Inception of pytorch-fid '
                     r'\(pt_inception-2015-12-05-6726825d.pth\): 1 keys with no counterpart '
                     r'\(AuxLogits.fc.weight\); 1 params with no key '
                     r'\(Mixed_7c/branch_pool/var\); 1 keys of another shape '
                     r'\(fc.weight \(1000, 2048\) for fc/kernel \(2048, 1008\)\)\.$'):
    inception_convert.convert_inception_state_dict(other)
  with pytest.raises(UserError, match=r'^w.pt is not the FID Inception \(it has no '
                     r'Mixed_6d.branch1x1.conv.weight\); give pytorch-fid'):
    inception_convert.convert_inception_state_dict({'conv.weight': np.zeros(3)}, 'w.pt')


# --- the metrics against the formulas ---------------------------------------------------------


def _closed_form_fid(mu1, sigma1, mu2, sigma2):
  """‖Δμ‖² + tr Σ₁ + tr Σ₂ − 2 Σ √λ(Σ₁^½ Σ₂ Σ₁^½), from symmetric eigendecompositions."""
  values, vectors = np.linalg.eigh(sigma1)
  root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
  middle = np.linalg.eigvalsh(root @ sigma2 @ root)
  return ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(
      np.clip(middle, 0, None)).sum()


def test_gaussians_match_the_closed_form():
  rng = np.random.default_rng(0)
  dim = 6
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
  sigma1, sigma2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
  fid = metrics.frechet_distance(metrics.Statistics(mu1, sigma1), metrics.Statistics(mu2, sigma2))
  assert fid == pytest.approx(_closed_form_fid(mu1, sigma1, mu2, sigma2), rel=1e-10)
  # Diagonal covariances: ‖Δμ‖² + Σ (√σ₁ − √σ₂)².
  d1, d2 = rng.uniform(0.5, 2, dim), rng.uniform(0.5, 2, dim)
  fid = metrics.frechet_distance(metrics.Statistics(mu1, np.diag(d1)),
                                 metrics.Statistics(mu2, np.diag(d2)))
  assert fid == pytest.approx(((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum(),
                              rel=1e-10)
  # Features drawn from the Gaussians: the fitted statistics approach the closed form.
  x1 = rng.multivariate_normal(mu1, sigma1, 200_000)
  x2 = rng.multivariate_normal(mu2, sigma2, 200_000)
  fid = metrics.frechet_distance(metrics.Statistics.of(x1), metrics.Statistics.of(x2))
  assert fid == pytest.approx(_closed_form_fid(mu1, sigma1, mu2, sigma2), rel=2e-2)


@pytest.mark.parametrize('count, dim', [(50, 16), (8, 2048)])
def test_fid_of_a_set_with_itself_is_zero(count, dim):
  x = np.random.default_rng(1).normal(2, 3, size=(count, dim))
  stats = metrics.Statistics.of(x)
  assert abs(metrics.frechet_distance(stats, stats)) < 1e-6


def test_a_singular_covariance_gives_the_full_square_roots_value():
  """Fewer images than dimensions: the range projection equals sqrtm on the full matrices."""
  rng = np.random.default_rng(2)
  few = metrics.Statistics.of(rng.normal(size=(10, 32)))
  assert few.basis.shape == (32, 9)
  many = metrics.Statistics.of(rng.normal(1, 2, size=(500, 32)))
  full = (((few.mu - many.mu) ** 2).sum() + np.trace(few.sigma) + np.trace(many.sigma)
          - 2 * np.trace(scipy.linalg.sqrtm(few.sigma @ many.sigma)).real)
  assert metrics.frechet_distance(few, many) == pytest.approx(full, rel=1e-6)
  assert metrics.frechet_distance(many, few) == pytest.approx(full, rel=1e-6)


def test_a_square_root_that_is_not_finite_is_retried_with_1e_6_on_the_diagonals(monkeypatch):
  rng = np.random.default_rng(3)
  a, b = (metrics.Statistics.of(rng.normal(size=(40, 5))) for _ in range(2))
  calls, sqrtm = [], scipy.linalg.sqrtm

  def first_not_finite(matrix):
    calls.append(matrix)
    return np.full_like(matrix, np.nan) if len(calls) == 1 else sqrtm(matrix)

  monkeypatch.setattr(metrics.scipy.linalg, 'sqrtm', first_not_finite)
  fid = metrics.frechet_distance(a, b)
  offset = 1e-6 * np.eye(5)
  np.testing.assert_array_equal(calls[1], (a.sigma + offset) @ (b.sigma + offset))
  assert np.isfinite(fid)


def test_statistics_that_are_not_covariances_are_refused():
  stats = metrics.Statistics(np.zeros(2), np.diag([1.0, -1.0]))
  with pytest.raises(UserError, match=r'^the square root of the covariance product has an '
                     r'imaginary part of 1 \(more than 1e-3\)'):
    metrics.frechet_distance(stats, metrics.Statistics(np.zeros(2), np.eye(2)))


def test_inception_score_matches_the_adm_evaluators_formula():
  logits = np.random.default_rng(4).normal(0, 3, size=(12_000, 1008))
  probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  scores = []
  for part in np.split(probabilities, [5000, 10_000]):  # splits of 5000, the last one short
    kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    scores.append(np.exp(kl.sum(axis=1).mean()))
  assert metrics.inception_score(logits) == pytest.approx(np.mean(scores), rel=1e-9)


def _mmd2_unbiased(x, y):
  """Mean kernel over distinct pairs within each set, minus twice the mean across the sets."""
  kernel = lambda u, v: (u @ v / len(u) + 1) ** 3
  m = len(x)
  within = sum(kernel(s[i], s[j]) for s in (x, y) for i in range(m) for j in range(m) if i != j)
  across = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
  return within / (m * (m - 1)) - 2 * across / (m * m)


@pytest.mark.parametrize('subset_size', [1000, 12])
def test_kid_matches_torch_fidelitys_subsets_and_estimate(subset_size):
  rng = np.random.default_rng(5)
  samples, reference = rng.normal(size=(30, 8)), rng.normal(0.5, 1, size=(25, 8))
  draw = np.random.RandomState(2020)
  size = min(subset_size, 25)
  mmds = [_mmd2_unbiased(samples[draw.choice(30, size, replace=False)],
                         reference[draw.choice(25, size, replace=False)]) for _ in range(4)]
  mean, std = metrics.kernel_inception_distance(samples, reference, subsets=4,
                                                subset_size=subset_size)
  assert (mean, std) == pytest.approx((np.mean(mmds), np.std(mmds)), rel=1e-9)


def test_precision_and_recall_match_the_k_nearest_neighbour_balls(monkeypatch):
  monkeypatch.setattr(metrics, '_ROW_BLOCK', 7)  # several blocks of rows
  rng = np.random.default_rng(6)
  samples, reference = rng.normal(size=(40, 8)), rng.normal(0.8, 1, size=(50, 8))
  squared = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)

  def inside(points, centres):
    radii = np.sort(squared(centres, centres), axis=1)[:, 3]  # column 0: the centre itself
    return (squared(points, centres) <= radii[None]).any(axis=1).mean()

  precision, recall = metrics.precision_recall(samples, reference)
  assert (precision, recall) == (inside(samples, reference), inside(reference, samples))
  assert 0 < precision < 1 and 0 < recall < 1


# --- extraction, the command and the evaluator (random Inception weights) ----------------------

SIZE = 32  # every image here: one compiled Inception program (batch 4), cached across processes
BATCH = 4


def _random_images(seed, count):
  return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def files(oracle, tmp_path_factory):
  """weights.pth (the oracle's weights), converted/ (by the convert command), samples/ (5 PNGs),
  reference.npz (a batch of 6) and reference_stats.npz (its statistics); an extractor of batch 4
  and the reference measured with it."""
  import torch
  root = tmp_path_factory.mktemp('fid')
  paths = {name: str(root / name) for name in ('weights.pth', 'converted', 'samples',
                                               'reference.npz', 'reference_stats.npz')}
  torch.save({k: torch.from_numpy(v) for k, v in oracle[1].items()}, paths['weights.pth'])
  os.makedirs(paths['samples'])
  for i, image in enumerate(_random_images(0, 5)):
    Image.fromarray(image).save(os.path.join(paths['samples'], f'{i:05d}.png'))
  Image.new('RGB', (70, 70)).save(os.path.join(paths['samples'], 'grid.png'))  # left out
  np.savez(paths['reference.npz'], arr_0=_random_images(1, 6))
  result = subprocess.run([sys.executable, '-m', 'visgen_jax.convert', '--kind=inception',
                           f'--input={paths["weights.pth"]}', f'--output={paths["converted"]}'],
                          cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  extractor = features.FeatureExtractor(inception_convert.load_inception(paths['converted']), BATCH)
  reference = features.measure(inputs.open_input(paths['reference.npz'], 'ref'), extractor, 'ref')
  inputs.save_statistics(paths['reference_stats.npz'], reference)
  return paths, extractor, reference


def test_extraction_keeps_every_image_and_drops_the_padding(files):
  paths, extractor, _ = files
  images = inputs.open_input(paths['samples'], 'SAMPLES').images
  assert images.count == 5  # grid.png left out
  got = features.extract_all(images, extractor, 'samples')  # batches of 4 and of 1 + 3 padding
  # Image 4 in a full batch among other images: the same outputs.
  alone = extractor([_random_images(0, 5)[[4, 0, 1, 2]]], 4, 'check')
  for name in ('pool', 'spatial', 'logits_unbiased'):
    assert got[name].shape[0] == 5
    np.testing.assert_allclose(got[name][4], alone[name][0], rtol=0, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got[name][:3], alone[name][1:], rtol=0, atol=1e-5, err_msg=name)


def _fid_command(*args):
  result = subprocess.run([sys.executable, '-m', 'visgen_jax.fid', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  return result


def test_command_compares_a_folder_with_a_batch_and_saves_statistics(files, tmp_path):
  paths, extractor, reference = files
  saved = str(tmp_path / 'stats.npz')
  result = _fid_command(paths['samples'], paths['reference.npz'], f'--inception={paths["weights.pth"]}',
                        f'--save-stats={saved}', f'--batch_size={BATCH}')
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  samples = features.measure(inputs.open_input(paths['samples'], 's'), extractor, 's')
  expected, _ = metrics.compare(samples, reference)
  assert set(expected) == {'fid', 'sfid', 'inception_score', 'kid', 'kid_std', 'precision', 'recall'}
  assert {k: printed[k] for k in expected} == pytest.approx(expected, rel=1e-6, abs=1e-9)
  assert (printed['num_samples'], printed['num_reference'], printed['not_computed']) == (5, 6, {})
  # The saved statistics as a reference: the same FID and sFID; KID and precision/recall need
  # the reference images.
  with np.load(saved) as stats:
    assert {k: stats[k].shape for k in stats.files} == {
        'mu': (2048,), 'sigma': (2048, 2048), 'mu_s': (2023,), 'sigma_s': (2023, 2023)}
  statistics = inputs.open_input(saved, 'REFERENCE')
  assert statistics.images is None
  values, skipped = metrics.compare(samples, features.measure(statistics, extractor, 'r'))
  assert values == pytest.approx({k: printed[k] for k in ('fid', 'sfid', 'inception_score')},
                                 rel=1e-9)
  assert set(skipped) == {'kid', 'precision', 'recall'}


def test_a_weights_file_that_is_not_the_fid_inception_exits_2_with_one_sentence(files, tmp_path):
  import torch
  paths = files[0]
  weights = str(tmp_path / 'resnet.pth')
  torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.weight': torch.zeros(1000, 512)},
             weights)
  result = _fid_command(paths['samples'], paths['reference.npz'], f'--inception={weights}')
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert lines[0] == (f"error: --inception='{weights}' is not the FID Inception (it has no "
                      'Mixed_6d.branch1x1.conv.weight); give pytorch-fid\'s '
                      'pt_inception-2015-12-05-6726825d.pth.')


def test_bad_inputs_are_one_sentence(tmp_path):
  one, mixed = tmp_path / 'one', tmp_path / 'mixed'
  for directory, sizes in ((one, [(8, 8)]), (mixed, [(8, 8), (8, 9)])):
    directory.mkdir()
    for i, size in enumerate(sizes):
      Image.new('RGB', size).save(directory / f'{i}.png')
  with pytest.raises(UserError, match=r"^SAMPLES='.*one' holds 1 image; FID needs at least 2\.$"):
    inputs.open_input(str(one), 'SAMPLES')
  with pytest.raises(UserError, match=r"^SAMPLES='.*mixed' mixes image sizes: 0.png is 8x8 but "
                     r'1.png is 8x9; resize the images to one size first\.$'):
    inputs.open_input(str(mixed), 'SAMPLES')
  stats = str(tmp_path / 'stats.npz')
  np.savez(stats, mu=np.zeros(10), sigma=np.eye(10))
  with pytest.raises(UserError, match=r"^REFERENCE='.*stats.npz' has mu of shape \(10,\) and sigma "
                     r"of shape \(10, 10\); the FID Inception's need \(2048,\) and \(2048, 2048\)\.$"):
    inputs.open_input(stats, 'REFERENCE')
  np.savez(stats, arr_0=np.zeros((3, 8, 8, 3), np.float32))
  with pytest.raises(UserError, match=r'has arr_0 of dtype float32 and shape \(3, 8, 8, 3\); '
                     r'images must be uint8'):
    inputs.open_input(stats, 'REFERENCE')
  with pytest.raises(UserError, match=r'is neither an image folder, a dataset directory nor an '
                     r'\.npz file\.$'):
    inputs.open_input(str(tmp_path / 'nothing.png'), 'REFERENCE')


ADM = 'configs/adm_ffhq256.py:tiny'


def _fid_evals(paths, **change):
  common = dict(type='fid', num_samples=6, batch_size=BATCH, inception=paths['converted'])
  return ml_collections.ConfigDict({
      'fid': {**common, 'reference': paths['reference.npz'], **change},
      'fid_stats': dict(common, reference=paths['reference_stats.npz'])})


def test_evaluator_on_adm_samples_during_training(files, tmp_path):
  paths = files[0]
  config = config_lib.load_config(ADM, ['total_steps=1', 'eval_every=1', 'sample_every=0'])
  config.unlock()
  config.evals = _fid_evals(paths)
  assert config.sample.num == 4 and config.data.resolution == SIZE  # 6 samples: 2 calls
  trainer.train(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    results = [json.loads(line) for line in f if '"fid/fid"' in line][0]
  metric = lambda name: results[f'fid/{name}']
  assert {k.split('/', 1)[1] for k in results if k.startswith('fid/')} == {
      'fid', 'sfid', 'inception_score', 'kid', 'kid_std', 'precision', 'recall'}
  assert metric('fid') > 0 and metric('sfid') > 0 and 0 <= metric('precision') <= 1
  # The same samples (keys of config.seed, the step and the call) against the statistics alone.
  for name in ('fid', 'sfid', 'inception_score'):
    assert results[f'fid_stats/{name}'] == pytest.approx(metric(name), rel=1e-9)
  assert not {'fid_stats/kid', 'fid_stats/precision', 'fid_stats/recall'} & set(results)


@pytest.mark.parametrize('change, message', [
    (dict(num_samples=1), r'config.evals.fid.num_samples=1 is not allowed: use an integer of at '
                          r'least 2\.'),
    (dict(inception=''), r"config.evals.fid.inception is not set; give the path of pytorch-fid's "),
    (dict(reference='/nonexistent.npz'), r"config.evals.fid.reference='/nonexistent.npz' is "
                                         r'neither an image folder'),
])
def test_evaluator_settings_are_checked_when_built(files, change, message):
  from visgen_jax import eval as eval_lib
  from visgen_jax.systems import get_system
  config = config_lib.load_config(ADM)
  config.unlock()
  config.evals = _fid_evals(files[0], **change)
  with pytest.raises(UserError, match=message):
    eval_lib.build_evaluators(config, get_system(config))


def test_a_dataset_is_read_as_the_evaluation_reads_it():
  from visgen_jax.data import sample_set
  from visgen_jax.eval import fid as fid_eval
  config = config_lib.load_config(ADM)  # the built-in faces at 32², centre crops
  default = fid_eval._reference(config, '', 'config.evals.fid.reference').images
  directory = inputs.open_input(sample_set.sample_dataset_dir('sample_faces', (SIZE, SIZE)),
                                'REFERENCE').images
  assert default.count == directory.count > 2
  np.testing.assert_array_equal(default.read(3, 6), directory.read(3, 6))
  assert directory.read(3, 6).shape == (3, SIZE, SIZE, 3)
