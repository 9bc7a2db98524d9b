"""DiffusionRig's claims at toy scale: `python -m visgen_jax.bench diffusionrig`.

Scale (so that 2 shared CPU cores finish in about 25 minutes): the built-in synthetic
subjects (data/rig_subjects.py) at RES², the `:tiny` model narrowed to one level (32
channels, one res block, no attention, as the Gen2Res toy), batch 16 without flips,
Adam 2e-3 (the toy's rate: 3e-4 left 600-step models sampling noise). Stage 1 trains
STEPS steps on every subject but the album subject 0, once conditioned on buffers and
once on the physical vector (model.condition=vector); stage 2 fine-tunes the buffer
model for STAGE2_STEPS steps, batch 4, on subject 0's album of 16 images, from the
stage-1 workdir with the encoder frozen (configs/diffusionrig_stage2.py; lr 2e-4, ten
times below stage 1 as in the paper). The models are kept in
$VISGEN_BENCH_DIR/diffusionrig (default <tmp>/visgen_bench) and reused on reruns.

Held-out images: HELD_OUT new renders of subject 0 (new lights, poses and
backgrounds: never seen in training, not even by stage 2). Sampling is DDIM-20, η = 0,
one noise per image shared by all its edits, as `--mode=edit` does.

  relight_*          each held-out image relit to a new random light by the stage-1 models:
                     light_rmse = RMSE of the light re-estimated from the output
                     (sh_lighting.estimate_light with the image's normals, albedo and mask)
                     to the requested one; pixel_rmse (in [0, 1]) to the ground truth, the
                     renderer's image of the same head under the new light. Reference:
                     light_rmse_if_unchanged, the requested light vs the original one.
  personalisation_*  PSNR of the held-out images reconstructed from their own buffers and
                     codes: stage 1 vs stage 2.
  disentanglement_*  stage-1 buffer model; each held-out image with the code, or the buffers,
                     of the next one: mean |change| vs the reconstruction, in [0, 1], inside
                     the faces (either image's mask) and outside (background, "hair").
  train_images_per_s the trainer's step of the buffer model vs a plain ADM UNet of the same
                     size (no buffers, code or encoder), interleaved repeats, median.
  edit_latency_*     DDIM-20 per image of one edit batch (the HELD_OUT images) at RES² (:tiny)
                     and at 256² (the paper's model, random weights: 20 × one UNet call);
                     compile time apart.
"""

import copy
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax import image_io
from visgen_jax.data import pipeline, rig_subjects
from visgen_jax.models import sh_lighting
from visgen_jax.systems import diffusionrig
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')
RES = 16
STEPS = 800
STAGE2_STEPS = 200
HELD_OUT = 8
BATCH = 16
TOY = (f'data.resolution={RES}', f'model.image_size={RES}', 'data.random_flip=False', f'batch_size={BATCH}',
       'model.channel_mult=1', 'model.attention_resolutions=', 'optimizer.learning_rate=2e-3', 'log_every=100',
       'sample_every=0', 'sampler.steps=20')
VECTOR = ('model.condition=vector', 'model.in_channels=3')
STAGE2 = (f'total_steps={STAGE2_STEPS}', f'ckpt_every={STAGE2_STEPS}', 'optimizer.learning_rate=2e-4')
THROUGHPUT_REPEATS = 5


def _say(message: str):
  print(f'bench diffusionrig: {message}', file=sys.stderr, flush=True)


def _bench_dir() -> str:
  return os.path.join(os.environ.get('VISGEN_BENCH_DIR', os.path.join(tempfile.gettempdir(), 'visgen_bench')),
                      'diffusionrig')


def stage1_config(*overrides):
  return config_lib.load_config(os.path.join(CONFIGS, 'diffusionrig_stage1.py') + ':tiny',
                                (*TOY, f'total_steps={STEPS}', f'ckpt_every={STEPS}', *overrides))


def stage2_config(stage1_dir, *overrides):
  return config_lib.load_config(os.path.join(CONFIGS, 'diffusionrig_stage2.py') + ':tiny',
                                (*TOY, *STAGE2, 'batch_size=4', f'init_from={stage1_dir}', *overrides))


def held_out_examples(n: int, seed: int = 99) -> dict:
  """n new renders of the album subject (0) with their buffers and physical parts, stacked."""
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(n):
    light = rig_subjects.random_light(rng)
    yaw, pitch = rng.uniform(-rig_subjects.MAX_ANGLE, rig_subjects.MAX_ANGLE, 2)
    example = rig_subjects.render(0, light, yaw, pitch, RES, rig_subjects.background(rng, RES))
    examples.append(dict(example, light=light, head_pose=np.array([yaw, pitch], np.float32),
                         head_axes=rig_subjects.subject_shape(0)))
  return _with_physical({k: np.stack([e[k] for e in examples]) for k in examples[0]})


def _with_physical(batch: dict) -> dict:
  physical = [rig_subjects.physical_vector({k: batch[k][i] for k in rig_subjects.PHYSICAL}, rig_subjects.PHYSICAL)
              for i in range(len(batch['image']))]
  return dict(batch, physical=np.stack(physical))


def relit(batch: dict, lights: np.ndarray) -> dict:
  """The batch under new lights: light, rendered buffer and physical vector replaced."""
  rendered = np.stack([np.asarray(sh_lighting.shade(n, a, m, l)) for n, a, m, l in
                       zip(batch['normal'], batch['albedo'], batch['alpha'], lights)])
  return _with_physical(dict(batch, light=lights, rendered=rendered))


def ground_truth(batch: dict) -> np.ndarray:
  """What the renderer draws for `batch` (buffers possibly relit) over the original background, in [0, 1]."""
  face = batch['alpha'][..., None] > 0
  return np.where(face, np.clip(batch['rendered'], 0, 1), (batch['image'] + 1) / 2)


class Model:
  """A model architecture's encode / generate on batches, from one shared noise per image;
  called with the parameters, so models of one architecture share the compiled functions."""

  def __init__(self, config):
    self.config = config
    _, encode, _, self.generate, _ = diffusionrig.networks(config)
    self.encode = jax.jit(encode)

  def code(self, params, batch):
    return self.encode(params, jnp.asarray(batch['image']))

  def __call__(self, params, batch, code=None, seed: int = 0):
    """Outputs in [0, 1] for the batch's conditions and `code` (default: the batch's own)."""
    code = self.code(params, batch) if code is None else code
    noise = jax.random.normal(jax.random.key(seed), batch['image'].shape)
    condition = diffusionrig.conditioning(self.config, {k: jnp.asarray(v) for k, v in batch.items()})
    return (np.clip(np.asarray(self.generate(params, noise, condition, code)), -1, 1) + 1) / 2


def _rmse(a, b, axes=None) -> float:
  return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2, axis=axes)).mean())


def relighting(model: Model, params, batch: dict, lights: np.ndarray) -> tuple[dict, np.ndarray]:
  """Light RMSE of the re-estimated light and pixel RMSE to the ground truth; the outputs."""
  target = relit(batch, lights)
  outputs = model(params, target)
  estimated = np.stack([np.asarray(sh_lighting.estimate_light(o, n, a, m)) for o, n, a, m in
                        zip(outputs, batch['normal'], batch['albedo'], batch['alpha'])])
  return {'light_rmse': _rmse(estimated, lights, (1, 2)),
          'pixel_rmse': _rmse(outputs, ground_truth(target), (1, 2, 3))}, outputs


def psnr(outputs, images01) -> float:
  mse = np.mean((outputs - images01) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(1 / mse)))


def disentanglement(model: Model, params, batch: dict, base: np.ndarray) -> tuple[dict, dict]:
  """Mean |change| vs `base` (the reconstructions) inside / outside the faces for a code swap and
  a buffer swap with the next image."""
  other = {k: np.roll(v, -1, axis=0) for k, v in batch.items()}
  swaps = {'code_swap': model(params, batch, code=model.code(params, other)),
           'buffer_swap': model(params, dict(batch, **{k: other[k] for k in (*rig_subjects.BUFFERS, 'physical')}))}
  face = ((batch['alpha'] > 0) | (other['alpha'] > 0))[..., None]
  result = {}
  for name, out in swaps.items():
    change = np.abs(out - base)
    result[f'{name}_change_in_face'] = float(change[np.broadcast_to(face, change.shape)].mean())
    result[f'{name}_change_outside_face'] = float(change[np.broadcast_to(~face, change.shape)].mean())
  return result, swaps


def plain_adm_config(config):
  """The same UNet without buffers, code or encoder: the 'adm' system."""
  plain = copy.deepcopy(config)
  with plain.unlocked():
    plain.system = 'adm'
    del plain.model['condition']
    plain.model.update(in_channels=3, code_dim=0)
  return plain


def _step_runner(config):
  """A function that runs one training step of `config`'s system through the trainer's step."""
  s = trainer.setup(config)
  step = trainer.make_train_step(s)
  batch = next(iter(pipeline.make_eval_iterator(config.data, local_batch_size=config.batch_size)))
  init_state = trainer._init_state  # pylint: disable=protected-access
  init = jax.jit(lambda k, b: init_state(s.system, s.tx, s.trainable, k, b), out_shardings=s.state_shardings)
  state = [init(jax.random.key(0), batch)]

  def run():
    state[0], metrics = step(state[0], batch)
    jax.block_until_ready(metrics)

  run()  # compile
  return run


def throughput(config) -> dict:
  """Training images/s, conditioned vs plain, interleaved repeats, the median of each."""
  runners = {'diffusionrig': _step_runner(config), 'plain_adm': _step_runner(plain_adm_config(config))}
  times = {name: [] for name in runners}
  for _ in range(THROUGHPUT_REPEATS):
    for name, run in runners.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  rates = {name: config.batch_size / statistics.median(t) for name, t in times.items()}
  return {**rates, 'conditioning_cost': rates['plain_adm'] / rates['diffusionrig'] - 1}


def edit_latency(model: Model, params, batch: dict) -> dict:
  """Seconds per image of DDIM-20 on `batch` (one edit batch: the first call of this shape), and
  the first call's extra time (compilation)."""
  start = time.perf_counter()
  model(params, batch)
  first = time.perf_counter() - start
  start = time.perf_counter()
  model(params, batch)
  steady = time.perf_counter() - start
  return {'seconds_per_image': steady / len(batch['image']), 'compile_seconds': first - steady}


def paper_edit_latency() -> dict:
  """DDIM-20 seconds per image at 256² with the paper's model (random weights: only the time
  matters), as 20 times one UNet call on one image (DDIM's own arithmetic is negligible, see
  `bench samplers`; a whole DDIM-20 takes too long on a shared 2-core CPU), and that call's
  compile time."""
  config = config_lib.load_config(os.path.join(CONFIGS, 'diffusionrig_stage1.py'), ('sampler.steps=20',))
  batch = {k: jnp.asarray(v) for k, v in _paper_batch(1).items()}
  init, encode, denoise, _, _ = diffusionrig.networks(config)
  params = jax.jit(init)(jax.random.key(0), batch)
  code = jax.jit(encode)(params, batch['image'])
  t = jnp.full((1,), 500, jnp.int32)
  call = jax.jit(lambda p, x: denoise(p, x, t, diffusionrig.conditioning(config, batch), code))
  times = []
  for _ in range(2):
    start = time.perf_counter()
    jax.block_until_ready(call(params, batch['image']))
    times.append(time.perf_counter() - start)
  return {'seconds_per_image': config.sampler.steps * times[1], 'compile_seconds': times[0] - times[1]}


def _paper_batch(n: int) -> dict:
  size = 256
  example = rig_subjects.render(0, rig_subjects.random_light(np.random.default_rng(0)), 0.1, 0.0, size)
  return _with_physical({k: np.repeat(v[None], n, axis=0) for k, v in dict(
      example, light=np.zeros((9, 3), np.float32), head_pose=np.zeros(2, np.float32),
      head_axes=rig_subjects.subject_shape(0), index=np.int32(0)).items()})


def run() -> dict:
  directory = _bench_dir()
  workdirs = {name: os.path.join(directory, name) for name in ('buffers', 'vector', 'stage2')}
  configs = {'buffers': stage1_config(), 'vector': stage1_config(*VECTOR),
             'stage2': stage2_config(workdirs['buffers'])}
  start = time.perf_counter()
  params = {}
  for name, config in configs.items():  # stage 2 last: it starts from the buffer model
    params[name] = trainer.train(config, workdirs[name])['params']
  train_seconds = time.perf_counter() - start
  models = {'buffers': Model(configs['buffers']), 'vector': Model(configs['vector'])}
  models['stage2'] = models['buffers']  # one architecture

  batch = held_out_examples(HELD_OUT)
  images01 = (batch['image'] + 1) / 2
  lights = np.stack([rig_subjects.random_light(np.random.default_rng([7, i])) for i in range(HELD_OUT)])
  result = {'scale': f'{RES}x{RES}, :tiny model with one level, batch {BATCH}, stage 1 {STEPS} steps, stage 2 {STAGE2_STEPS} '
                     f'steps, {HELD_OUT} held-out renders of the album subject, DDIM-20',
            'train_seconds': train_seconds}
  # First: the buffer model's first generation of this batch shape includes its compilation.
  _say('evaluating')
  result['edit_latency_tiny'] = edit_latency(models['buffers'], params['buffers'], batch)
  relit_outputs = {}
  for name in ('buffers', 'vector'):
    scores, relit_outputs[name] = relighting(models[name], params[name], batch, lights)
    result.update({f'relight_{k}_{name}': v for k, v in scores.items()})
  result['relight_light_rmse_if_unchanged'] = _rmse(batch['light'], lights, (1, 2))

  reconstructions = {name: models[name](params[name], batch) for name in ('buffers', 'stage2')}
  result['personalisation_psnr_stage1'] = psnr(reconstructions['buffers'], images01)
  result['personalisation_psnr_stage2'] = psnr(reconstructions['stage2'], images01)

  scores, swaps = disentanglement(models['buffers'], params['buffers'], batch, reconstructions['buffers'])
  result.update({f'disentanglement_{k}': v for k, v in scores.items()})

  _say('training throughput')
  result['train_images_per_s'] = throughput(configs['buffers'])
  _say('edit latency at 256x256')
  result['edit_latency_256'] = paper_edit_latency()

  # Rows: held-out images; columns: input, ground truth relit, buffers relit, vector relit,
  # stage-1 and stage-2 reconstructions, code swap, buffer swap.
  columns = [images01, ground_truth(relit(batch, lights)), relit_outputs['buffers'], relit_outputs['vector'],
             reconstructions['buffers'], reconstructions['stage2'], swaps['code_swap'], swaps['buffer_swap']]
  figure = os.path.join(directory, 'diffusionrig_bench.png')
  image_io.save_png(figure, image_io.image_grid(np.stack(columns, axis=1).reshape(-1, RES, RES, 3) * 2 - 1))
  print(f'figure: {figure} (rows: held-out images; columns: input, ground-truth relit, relit by the buffer '
        'model, by the vector model, stage-1 and stage-2 reconstructions, code swap, buffer swap)')
  result['figure'] = figure
  result['load_average'] = os.getloadavg()
  return result
