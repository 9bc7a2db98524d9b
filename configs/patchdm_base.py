"""The settings every Patch-DM config shares (the paper's), imported by
configs/patchdm_*.py, which differ only in data and size; not a config itself.

config.model: exactly PatchUNet's fields (visgen_jax/models/patch_unet.py).

config.codes: the global semantic code, both ways of the paper (codes.source):
  'table'   — one code per training image (`batch['index']` picks it), optimised
              jointly; codes.num rows (0 = the data size). codes.init='random'
              starts it N(0, 1); 'clip' starts row i at the CLIP image embedding
              of training image i (codes.clip_checkpoint, codes.clip_preset), as
              the public code's initialize.py: CLIP's evaluation transform,
              `encode_image`'s projected embedding, not L2-normalised; computed
              before the first step of a fresh run, never on resume.
              model.code_dim must equal CLIP's embed_dim (512 for ViT-B/16).
              Rows past the data size stay N(0, 1).
  'encoder' — a semantic encoder (Diff-AE's half UNet; codes.encoder: exactly
              SemanticEncoder's fields but code_dim and attn_impl, which are
              model's) trained with the UNet maps the whole training image,
              resized to codes.encoder.size, to its code (the public code's 256²
              models). New codes come from the latent DPM, trained on
              stop_gradient of the batch's encoder codes (the public code trains
              it afterwards on the training set's codes, without
              z-normalisation): latent.enabled=true and latent.znormalize=false
              are required; sample.code_index has no table to pick from.

config.latent: the latent DPM over the codes (Diff-AE's MLPSkipNet; the public
code's train_latent.py): ε-prediction with an L1 loss on a constant-β schedule
(const0.008) over latent.batch_size random table rows each step, or the
batch's encoder codes; raw, or z-normalised by the table's per-dimension mean
and std (latent.znormalize, Diff-AE's default). latent.stage:
  'joint'  — in the same steps as the UNet on stop_gradient(codes), its loss
             added with weight latent.loss_weight: one run and one checkpoint
             carry both, the UNet's gradients are untouched.
  'second' — the paper's second stage: a run of its own (a new workdir) that
             starts from the finished first run (trained with
             latent.enabled=false or joint) by config.init_from=<its workdir>
             (its EMA weights) with config.frozen=('^(?!latent/)',), and trains
             only the latent DPM on the first run's table or encoder (eval
             mode); UNet, codes and encoder are frozen copies, so the second
             workdir samples alone; on a table it reads no images (the
             trainer feeds no data). Public code: batch 512, AdamW (weight
             decay 0.01), 60M samples.
Sampling draws codes with DDIM (latent.sample_steps) unless sample.code_index
picks table rows.
"""

import ml_collections

from visgen_jax.diffusion import editing
from visgen_jax.train.config import base_config


def encoder_size(resolution, shorter: int = 256):
  """The semantic encoder's input: `resolution` scaled down to a shorter side
  of at most `shorter` (the public code's 256² encoder input)."""
  h, w = resolution
  if min(h, w) <= shorter:
    return (h, w)
  return (h * shorter // min(h, w), w * shorter // min(h, w))


def config(resolution, sample_num: int = 4):
  """Patch-DM on images of `resolution` (H, W)."""
  c = base_config()
  c.system = 'patchdm'
  # Public code: Adam(W) 1e-4, batch 32 x 4 GPUs, EMA 0.9999, no warmup.
  c.total_steps = 500_000
  c.batch_size = 128
  c.log_every = 100
  c.ckpt_every = 5_000
  c.sample_every = 10_000
  c.optimizer.learning_rate = 1e-4
  c.optimizer.grad_clip = 1.0
  # (H, W): an int resolution in base_config would refuse a tuple.
  c.data = ml_collections.ConfigDict(dict(c.data, resolution=tuple(resolution)))
  c.data.name = 'sample'  # the built-in photographs, resized; or folder + data.path
  c.data.random_flip = True
  c.model = ml_collections.ConfigDict(dict(
      patch_size=64, in_channels=3, model_channels=64, out_channels=3, num_res_blocks=2,
      attention_resolutions=(16,), dropout=0.1, channel_mult=(1, 2, 4, 8), num_heads=1,
      num_head_channels=-1, resblock_updown=True, embed_dim=512, pos_channels=64, code_dim=512,
      remat=False, attn_impl='xla', collage_impl='xla'))
  c.codes = ml_collections.ConfigDict(dict(
      source='table',  # or 'encoder': a semantic encoder of the whole image, trained jointly
      num=0,  # rows of the code table; 0 = the number of training images
      init='random',  # table start; 'clip': CLIP image embeddings of the training images
      clip_checkpoint='',  # for init=clip: OpenAI's ViT-B-16.pt (or open_clip .bin/.safetensors)
      clip_preset='ViT-B-16-quickgelu',  # its architecture and activation; '' = read off an OpenAI .pt
      # Diff-AE's half UNet as the public code builds it; the image is resized to `size` first.
      encoder=ml_collections.ConfigDict(dict(
          size=encoder_size(resolution), model_channels=64, channel_mult=(1, 2, 4, 8, 8), num_res_blocks=2,
          attention_resolutions=(16,), dropout=0.1, num_heads=1, num_head_channels=-1,
          resblock_updown=True))))
  c.diffusion = ml_collections.ConfigDict(dict(
      noise_schedule='linear', num_timesteps=1000, learn_sigma=False,
      code_drop=0.1, pos_drop=0.5))  # classifier-free dropout of the code / the position
  c.sampler = ml_collections.ConfigDict(dict(name='ddim', steps=50, eta=0.0, guidance_scale=0.0))
  c.sample.num = sample_num
  c.sample.size = tuple(resolution)
  c.sample.positions = 'interpolate'  # or 'extend': beyond the trained grid, no position there
  c.sample.code_index = ()  # rows of the code table, one per image; () = drawn by the latent DPM
  c.sample.stream_rows = 0  # > 0: denoise in bands of this many patch rows (memory ~ width)
  c.sample.shard_rows = False  # True: the patch rows over config.mesh's model axis, the images over data × fsdp
  # The paper's seam ablation: 'independent' patches or 'pixel_shift'ed patch grids instead of collage.
  c.sample.patch_mode = 'collage'
  # The latent DPM over the codes (public code: Diff-AE's MLPSkipNet, L1, const0.008, eps).
  c.latent = ml_collections.ConfigDict(dict(
      enabled=True, num_layers=10, hidden=2048, time_channels=64, dropout=0.0,
      noise_schedule='const0.008', num_timesteps=1000, loss_type='l1',
      batch_size=512, loss_weight=1.0, sample_steps=50,
      znormalize=False,  # True: codes → (codes - mean) / std per dimension, over the table
      stage='joint'))  # or 'second': only the latent DPM, on a finished run (init_from, frozen)
  c.edit = editing.edit_config()
  return c


def tiny(c, resolution):
  """A CPU-sized variant at `resolution`: 16² patches, one level of downsampling, small embeddings."""
  c.total_steps = 20
  c.batch_size = 4
  c.log_every = 5
  c.ckpt_every = 10
  c.sample_every = 20
  c.optimizer.ema_decay = 0.99
  c.data.resolution = tuple(resolution)
  c.model.update(patch_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), embed_dim=64, pos_channels=16, code_dim=32)
  size = encoder_size(resolution, min(resolution) // 2)
  c.codes.encoder.update(size=size, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(size[0] // 2,))
  c.sampler.steps = 5
  c.latent.update(num_layers=3, hidden=64, batch_size=16, sample_steps=5)
  c.sample.num = 2
  c.sample.size = tuple(resolution)
  return c
