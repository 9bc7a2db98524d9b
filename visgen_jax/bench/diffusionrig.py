"""DiffusionRig's claims at toy scale: `python -m visgen_jax.bench diffusionrig`.

Toy (so that 2 shared CPU cores finish in 18–40 minutes, with the load; every choice is the same for
both conditionings, the ablation differs only in model.condition and in_channels):
  data       the built-in synthetic subjects (data/rig_subjects.py) at RES² = 16², batch 16,
             no flips (the vector model refuses them). Their albedo buffer is coarse (base
             colour and eyes, as a 3DMM's), the images have the full texture.
  model      the `:tiny` UNet narrowed to one level (one res block, no attention, as the
             Gen2Res toy) but 64 channels, not 32: GroupNorm has 32 groups, so at 32 channels
             every group is one channel (an instance norm) and the output block's norm
             removes each channel's per-image mean. The UNet then cannot reproduce the
             per-image mean colour of x_t in ε̂; at high noise an error δ there is a colour
             cast √((1−ᾱ)/ᾱ)·δ in x̂₀ (25× at t = 800), which DDIM carries into the sample.
             Measured on training images after 1000 steps: 32 channels, faces tinted with
             their background's colour (per-image face colour error 0.21 in [0, 1], face
             RMSE 0.26, ε-MSE at t = 800 0.0061); 64 channels (2 per group) 0.026, 0.071
             and 0.0012. The paper's 128 channels have 4 per group. Dropout 0 (the paper's
             0.1 regularises 50k steps; a 1000-step toy is far from overfitting its noise).
  training   the paper's loss (ε-MSE, P2 γ = 1, k = 1) and optimiser (Adam, clip 1.0, no
             EMA), at the toy's rate 2e-3 (3e-4 left 600-step models sampling noise) with 50
             warm-up steps and cosine decay to 0, so the last steps refine at a small rate
             (with dropout 0 and 1000 steps instead of 800, this moved the 32-channel toy's
             face RMSE only from 0.265 to 0.260: the channels did it). Stage 1: STEPS steps
             on every subject but the album subject 0, once conditioned on buffers and once
             on the physical vector (model.condition=vector). Stage 2: STAGE2_STEPS steps, batch 4,
             on subject 0's album of 16 images from each stage-1 workdir, encoder
             frozen (configs/diffusionrig_stage2.py), lr 2e-4 (ten times below stage 1, as in
             the paper), same warm-up and decay.
  cache      the models are kept in $VISGEN_BENCH_DIR/diffusionrig-v2 (default
             <tmp>/visgen_bench; the version changes with the data) and reused on reruns.

Held-out images: HELD_OUT new renders of subject 0 (new lights, poses and backgrounds:
never seen in training, not even by stage 2). Sampling is DDIM-20, η = 0, one noise per
image shared by all its edits, as `--mode=edit` does; codes from the encoder's running
BatchNorm statistics, as `--mode=edit` computes them (at 16² the encoder's last two
stages are 1×1, so training-time batch statistics are over 16 values and an image's code in
training varies with its batch: correlation 0.5–0.99 with its running-statistics code over
three random batches of the 32-channel toy; the toy's UNet leans on the code little).

  relight_*          each held-out image relit to a new random light by the stage-1 models
                     and by their stage-2 fine-tunes (the vector model's too: the same
                     stage-2 config with model.condition=vector; personalised models are
                     what users edit with):
                     light_rmse = RMSE of the light re-estimated from the output
                     (sh_lighting.estimate_light with the image's normals, full texture and
                     mask) to the requested one; pixel_rmse (in [0, 1]) to the ground truth, the
                     renderer's image of the same head (full texture, same pose and
                     background) under the new light. The models see the buffers relit: the
                     coarse albedo shaded with the new light. Reference:
                     light_rmse_if_unchanged, the requested light vs the original one.
  personalisation_*  PSNR of the held-out images reconstructed from their own buffers and
                     codes, of the whole image and inside the face (mask): stage 1 vs stage 2.
  disentanglement_*  stage-1 buffer model; each held-out image with the code, or the buffers,
                     of the next one: mean |change| vs the reconstruction, in [0, 1], inside
                     the faces (either image's mask) and outside (background, "hair").
  claims             each claim as the per-image differences it says are positive (vector −
                     buffers relighting errors at stage 1 and stage 2, stage 2 − stage 1 PSNR
                     (whole and face),
                     code swap outside −
                     inside, buffer swap inside − outside): mean, standard error, and
                     `shown` = the mean is more than SHOWN_AT standard errors above 0.
  train_images_per_s the trainer's step of the toy buffer model (batch 16) vs a plain ADM UNet
                     of the same size (no buffers, code or encoder), interleaved repeats, median;
                     with the buffer model's FLOPs per step (`diffusionrig_flops`, and its MFU on
                     a GPU/TPU; so too below).
  unet_gradient_images_per_s_256  the same comparison for the paper's stage-1 model
                     (configs/diffusionrig_stage1.py, 256²) at batch 1, but of one forward and
                     backward pass of the loss through the UNet alone (buffers and code vs
                     none; no encoder, no optimizer update): the trainer's whole step of both
                     256² models took over 15 minutes with their compilation on 2 loaded cores.
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
from visgen_jax.bench.common import flops_report
from visgen_jax.data import pipeline, rig_subjects
from visgen_jax.diffusion import losses, schedules
from visgen_jax.models import sh_lighting
from visgen_jax.models.adm_unet import ADMUNet
from visgen_jax.systems import diffusionrig
from visgen_jax.train import config as config_lib
from visgen_jax.train import trainer

CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')
RES = 16
STEPS = 1000
STAGE2_STEPS = 200
HELD_OUT = 32
BATCH = 16
TOY = (f'data.resolution={RES}', f'model.image_size={RES}', 'data.random_flip=False', f'batch_size={BATCH}',
       'model.model_channels=64', 'model.channel_mult=1', 'model.attention_resolutions=', 'model.dropout=0.0',
       'optimizer.learning_rate=2e-3', 'optimizer.warmup_steps=50', 'optimizer.schedule=cosine', 'log_every=100',
       'sample_every=0', 'sampler.steps=20')
VECTOR = ('model.condition=vector', 'model.in_channels=3')
STAGE2 = (f'total_steps={STAGE2_STEPS}', f'ckpt_every={STAGE2_STEPS}', 'optimizer.learning_rate=2e-4')
THROUGHPUT_REPEATS = 5
PAPER_REPEATS = 3  # 256² UNet gradients, several seconds each on 2 cores
SHOWN_AT = 2  # standard errors: a claim is shown when its mean paired difference is beyond this


def _say(message: str):
  print(f'bench diffusionrig: {message}', file=sys.stderr, flush=True)


def _bench_dir() -> str:
  return os.path.join(os.environ.get('VISGEN_BENCH_DIR', os.path.join(tempfile.gettempdir(), 'visgen_bench')),
                      'diffusionrig-v2')


def stage1_config(*overrides):
  return config_lib.load_config(os.path.join(CONFIGS, 'diffusionrig_stage1.py') + ':tiny',
                                (*TOY, f'total_steps={STEPS}', f'ckpt_every={STEPS}', *overrides))


def stage2_config(stage1_dir, *overrides):
  return config_lib.load_config(os.path.join(CONFIGS, 'diffusionrig_stage2.py') + ':tiny',
                                (*TOY, *STAGE2, 'batch_size=4', f'init_from={stage1_dir}', *overrides))


def held_out_examples(n: int, seed: int = 99) -> dict:
  """n new renders of the album subject (0) with their buffers, full texture, background and
  physical parts, stacked."""
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(n):
    light = rig_subjects.random_light(rng)
    yaw, pitch = rng.uniform(-rig_subjects.MAX_ANGLE, rig_subjects.MAX_ANGLE, 2)
    backdrop = rig_subjects.background(rng, RES)
    example = rig_subjects.render(0, light, yaw, pitch, RES, backdrop)
    examples.append(dict(example, background=backdrop, light=light, head_pose=np.array([yaw, pitch], np.float32),
                         head_axes=rig_subjects.subject_shape(0)))
  return _with_physical({k: np.stack([e[k] for e in examples]) for k in examples[0]})


def _with_physical(batch: dict) -> dict:
  physical = [rig_subjects.physical_vector({k: batch[k][i] for k in rig_subjects.PHYSICAL}, rig_subjects.PHYSICAL)
              for i in range(len(batch['image']))]
  return dict(batch, physical=np.stack(physical))


def relit(batch: dict, lights: np.ndarray) -> dict:
  """The batch's conditions under new lights: light, rendered buffer (the coarse albedo shaded)
  and physical vector replaced."""
  rendered = np.stack([np.asarray(sh_lighting.shade(n, a, m, l)) for n, a, m, l in
                       zip(batch['normal'], batch['albedo'], batch['alpha'], lights)])
  return _with_physical(dict(batch, light=lights, rendered=rendered))


def relit_ground_truth(batch: dict, lights: np.ndarray) -> np.ndarray:
  """The renderer's images of the batch's heads (full texture, same pose and background) under
  `lights`, in [0, 1]."""
  return np.stack([(rig_subjects.render(0, light, *pose, RES, backdrop)['image'] + 1) / 2
                   for light, pose, backdrop in zip(lights, batch['head_pose'], batch['background'])])


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


def _rmse(a, b, axes) -> np.ndarray:
  """Per-image RMSE."""
  return np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2, axis=axes))


def relighting(model: Model, params, batch: dict, target: dict, truth: np.ndarray) -> tuple[dict, np.ndarray]:
  """Per image: light RMSE of the light re-estimated from the outputs for `target` (`relit(batch,
  lights)`) and pixel RMSE to `truth` (`relit_ground_truth(batch, lights)`); the outputs."""
  lights = target['light']
  outputs = model(params, target)
  estimated = np.stack([np.asarray(sh_lighting.estimate_light(o, n, a, m)) for o, n, a, m in
                        zip(outputs, batch['normal'], batch['texture'], batch['alpha'])])
  return {'light_rmse': _rmse(estimated, lights, (1, 2)),
          'pixel_rmse': _rmse(outputs, truth, (1, 2, 3))}, outputs


def psnr(outputs, images01, mask=None) -> np.ndarray:
  """Per-image PSNR in dB, over the pixels where `mask` [b, H, W] is 1 (default: all)."""
  weight = np.ones(outputs.shape[:-1]) if mask is None else mask
  squared = ((outputs - images01) ** 2).mean(-1)
  return 10 * np.log10(1 / ((squared * weight).sum((1, 2)) / weight.sum((1, 2))))


def disentanglement(model: Model, params, batch: dict, base: np.ndarray) -> tuple[dict, dict]:
  """Per image: mean |change| vs `base` (the reconstructions) inside / outside the faces (either
  image's mask) for a code swap and a buffer swap with the next image."""
  other = {k: np.roll(v, -1, axis=0) for k, v in batch.items()}
  swaps = {'code_swap': model(params, batch, code=model.code(params, other)),
           'buffer_swap': model(params, dict(batch, **{k: other[k] for k in (*rig_subjects.BUFFERS, 'physical')}))}
  face = ((batch['alpha'] > 0) | (other['alpha'] > 0))[..., None].astype(np.float32)
  result = {}
  for name, out in swaps.items():
    change = np.abs(out - base).mean(axis=-1, keepdims=True)
    result[f'{name}_change_in_face'] = (change * face).sum((1, 2, 3)) / face.sum((1, 2, 3))
    result[f'{name}_change_outside_face'] = (change * (1 - face)).sum((1, 2, 3)) / (1 - face).sum((1, 2, 3))
  return result, swaps


def paired(claimed_positive: np.ndarray) -> dict:
  """A claim as per-image differences that it says are positive: their mean, its standard error,
  and whether the mean is beyond noise (more than SHOWN_AT standard errors above 0)."""
  mean = float(np.mean(claimed_positive))
  standard_error = float(np.std(claimed_positive, ddof=1) / np.sqrt(len(claimed_positive)))
  return {'mean_difference': mean, 'standard_error': standard_error, 'shown': mean > SHOWN_AT * standard_error}


def plain_adm_config(config):
  """The same UNet without buffers, code or encoder: the 'adm' system."""
  plain = copy.deepcopy(config)
  with plain.unlocked():
    plain.system = 'adm'
    del plain.model['condition']
    plain.model.update(in_channels=3, code_dim=0)
  return plain


def _step_runner(config, batch):
  """A function that runs one training step of `config`'s system on `batch` through the trainer's step."""
  s = trainer.setup(config)
  step = trainer.make_train_step(s)
  init_state, keep_ema = trainer._init_state, trainer._keeps_ema(config)  # pylint: disable=protected-access
  init = jax.jit(lambda k, b: init_state(s.system, s.tx, s.trainable, k, b, keep_ema),
                 out_shardings=s.state_shardings)
  state = [init(jax.random.key(0), batch)]

  def run():
    state[0], metrics = step(state[0], batch)
    jax.block_until_ready(metrics)

  run()  # compile
  run.flops = lambda seconds: flops_report(step, (state[0], batch), seconds, dtype=config.compute_dtype)
  return run


def _interleaved_rates(runners: dict, images: int, repeats: int) -> dict:
  """Images/s of each runner (one call: `images` images), interleaved repeats, the median of each,
  the conditioning cost (plain_adm's rate over diffusionrig's, minus 1) and the conditioned
  model's FLOPs per call (with its MFU on a GPU/TPU)."""
  times = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  rates = {name: images / statistics.median(t) for name, t in times.items()}
  return {**rates, 'conditioning_cost': rates['plain_adm'] / rates['diffusionrig'] - 1,
          'diffusionrig_flops': runners['diffusionrig'].flops(images / rates['diffusionrig'])}


def throughput(config, batch, repeats: int) -> dict:
  """Training images/s of `config` (the conditioned model) and of the plain ADM UNet of its size on
  `batch`, the trainer's whole step (after one compiling step each)."""
  runners = {'diffusionrig': _step_runner(config, batch), 'plain_adm': _step_runner(plain_adm_config(config), batch)}
  return _interleaved_rates(runners, len(batch['image']), repeats)


def _unet_gradient_runner(unet: ADMUNet, batch: dict, condition, code, p2: dict):
  """A function that runs one forward and backward pass of the ε-MSE loss through `unet` alone,
  x_t concatenated with `condition` (channels, maybe none) and the given `code` (or None)."""
  schedule = schedules.make_schedule('linear', 1000)
  image, t = jnp.asarray(batch['image']), jnp.zeros(len(batch['image']), jnp.int32)
  params = jax.jit(unet.init)(jax.random.key(0), jnp.concatenate([image, condition], -1), t, code=code)['params']

  def loss(params, key):
    model_fn = lambda x_t, t: unet.apply({'params': params}, jnp.concatenate([x_t, condition], -1), t, code=code,
                                         train=True, rngs={'dropout': key})
    return losses.diffusion_loss(schedule, model_fn, image, key, **p2)[0].mean()

  gradient = jax.jit(jax.grad(loss))

  def run():
    jax.block_until_ready(gradient(params, jax.random.key(1)))

  run()  # compile
  run.flops = lambda seconds: flops_report(gradient, (params, jax.random.key(1)), seconds)
  return run


def unet_throughput(config, batch, repeats: int) -> dict:
  """As `throughput`, but one forward and backward pass through the UNet alone (no encoder, no
  optimizer update): the buffer-conditioned UNet with a code vs the plain one."""
  p2 = dict(p2_gamma=config.diffusion.p2_gamma, p2_k=config.diffusion.p2_k)
  image = jnp.asarray(batch['image'])
  runners = {
      'diffusionrig': _unet_gradient_runner(
          diffusionrig._unet(config), batch,  # pylint: disable=protected-access
          diffusionrig.conditioning(config, {k: jnp.asarray(v) for k, v in batch.items()}),
          jnp.ones((len(image), config.model.code_dim)), p2),
      'plain_adm': _unet_gradient_runner(ADMUNet(**plain_adm_config(config).model), batch, image[..., :0], None, p2)}
  return _interleaved_rates(runners, len(image), repeats)


def paper_config(*overrides):
  """configs/diffusionrig_stage1.py as it is (256², the paper's model), with `overrides`."""
  return config_lib.load_config(os.path.join(CONFIGS, 'diffusionrig_stage1.py'), overrides)


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
  config = paper_config('sampler.steps=20')
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
  workdirs = {name: os.path.join(directory, name) for name in ('buffers', 'vector', 'stage2', 'stage2_vector')}
  configs = {'buffers': stage1_config(), 'vector': stage1_config(*VECTOR),
             'stage2': stage2_config(workdirs['buffers']), 'stage2_vector': stage2_config(workdirs['vector'], *VECTOR)}
  start = time.perf_counter()
  params = {}
  for name, config in configs.items():  # stage 2 last: it starts from the stage-1 models
    params[name] = trainer.train(config, workdirs[name])['params']
  train_seconds = time.perf_counter() - start
  models = {'buffers': Model(configs['buffers']), 'vector': Model(configs['vector'])}
  models.update(stage2=models['buffers'], stage2_vector=models['vector'])  # one architecture each

  batch = held_out_examples(HELD_OUT)
  images01 = (batch['image'] + 1) / 2
  lights = np.stack([rig_subjects.random_light(np.random.default_rng([7, i])) for i in range(HELD_OUT)])
  result = {'scale': f'{RES}x{RES}, :tiny model with one level, batch {BATCH}, stage 1 {STEPS} steps, stage 2 '
                     f'{STAGE2_STEPS} steps, {HELD_OUT} held-out renders of the album subject, DDIM-20',
            'train_seconds': train_seconds}
  # First: the buffer model's first generation of this batch shape includes its compilation.
  _say('evaluating')
  result['edit_latency_tiny'] = edit_latency(models['buffers'], params['buffers'], batch)
  target, truth = relit(batch, lights), relit_ground_truth(batch, lights)
  relight, relit_outputs = {}, {}
  for name in ('buffers', 'vector', 'stage2', 'stage2_vector'):
    relight[name], relit_outputs[name] = relighting(models[name], params[name], batch, target, truth)
    result.update({f'relight_{k}_{name}': float(v.mean()) for k, v in relight[name].items()})
  result['relight_light_rmse_if_unchanged'] = float(_rmse(batch['light'], lights, (1, 2)).mean())

  reconstructions = {name: models[name](params[name], batch) for name in ('buffers', 'stage2')}
  personalisation = {name: psnr(reconstructions[name], images01) for name in ('buffers', 'stage2')}
  in_face = {name: psnr(reconstructions[name], images01, batch['alpha']) for name in ('buffers', 'stage2')}
  result['personalisation_psnr_stage1'] = float(personalisation['buffers'].mean())
  result['personalisation_psnr_stage2'] = float(personalisation['stage2'].mean())
  result['personalisation_face_psnr_stage1'] = float(in_face['buffers'].mean())
  result['personalisation_face_psnr_stage2'] = float(in_face['stage2'].mean())
  result['reconstruction_pixel_rmse_stage1'] = float(_rmse(reconstructions['buffers'], images01, (1, 2, 3)).mean())

  changes, swaps = disentanglement(models['buffers'], params['buffers'], batch, reconstructions['buffers'])
  result.update({f'disentanglement_{k}': float(v.mean()) for k, v in changes.items()})

  result['claims'] = {  # each as per-image differences the paper says are positive
      'a_relight_light_rmse_vector_minus_buffers': paired(relight['vector']['light_rmse'] -
                                                          relight['buffers']['light_rmse']),
      'a_relight_pixel_rmse_vector_minus_buffers': paired(relight['vector']['pixel_rmse'] -
                                                          relight['buffers']['pixel_rmse']),
      'a_stage2_relight_light_rmse_vector_minus_buffers': paired(relight['stage2_vector']['light_rmse'] -
                                                                 relight['stage2']['light_rmse']),
      'a_stage2_relight_pixel_rmse_vector_minus_buffers': paired(relight['stage2_vector']['pixel_rmse'] -
                                                                 relight['stage2']['pixel_rmse']),
      'b_personalisation_psnr_stage2_minus_stage1': paired(personalisation['stage2'] - personalisation['buffers']),
      'b_personalisation_face_psnr_stage2_minus_stage1': paired(in_face['stage2'] - in_face['buffers']),
      'c_code_swap_change_outside_minus_inside': paired(changes['code_swap_change_outside_face'] -
                                                        changes['code_swap_change_in_face']),
      'c_buffer_swap_change_inside_minus_outside': paired(changes['buffer_swap_change_in_face'] -
                                                          changes['buffer_swap_change_outside_face']),
  }

  _say('training throughput at the toy')
  toy_batch = next(iter(pipeline.make_eval_iterator(configs['buffers'].data, local_batch_size=BATCH)))
  result['train_images_per_s'] = throughput(configs['buffers'], toy_batch, THROUGHPUT_REPEATS)
  _say('UNet forward and backward at 256x256, batch 1')
  result['unet_gradient_images_per_s_256'] = unet_throughput(paper_config(), _paper_batch(1), PAPER_REPEATS)
  _say('edit latency at 256x256')
  result['edit_latency_256'] = paper_edit_latency()

  # Rows: held-out images; columns: input, ground truth relit, relit by the stage-1 buffer and
  # vector models and by their stage-2 fine-tunes, stage-1 and stage-2 reconstructions, code swap,
  # buffer swap.
  columns = [images01, truth, relit_outputs['buffers'], relit_outputs['vector'],
             relit_outputs['stage2'], relit_outputs['stage2_vector'], reconstructions['buffers'],
             reconstructions['stage2'], swaps['code_swap'], swaps['buffer_swap']]
  figure = os.path.join(directory, 'diffusionrig_bench.png')
  image_io.save_png(figure, image_io.image_grid(np.stack(columns, axis=1).reshape(-1, RES, RES, 3) * 2 - 1,
                                                    cols=len(columns)))
  print(f'figure: {figure} (rows: held-out images; columns: input, ground-truth relit, relit by the stage-1 '
        'buffer and vector models and by their stage-2 fine-tunes, stage-1 and stage-2 reconstructions, code '
        'swap, buffer swap)')
  result['figure'] = figure
  result['load_average'] = os.getloadavg()
  return result
