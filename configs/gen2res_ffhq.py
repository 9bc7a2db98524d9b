"""Gen2Res on FFHQ 256²: restoration by generation with constrained priors (Ding et al.),
on the ADM base model of configs/adm_ffhq256.py (the released base_256.pt loads through init_from).

  # The whole single-image path: generative album -> fine-tune -> restore (resumes at its stage):
  python -m visgen_jax.main --config=configs/gen2res_ffhq.py --workdir=W --mode=gen2res \
      --config.init_from=base_256.pt --config.gen2res.input=degraded.png
  # Stage by stage:
  ... --mode=album --config.init_from=base_256.pt --config.gen2res.input=degraded.png   # W/album/, W/album.png
  ... --mode=finetune --config.init_from=base_256.pt                                    # on W/album
  ... --mode=restore --config.gen2res.input=degraded.png|FOLDER                        # W/restored/
  # A personal album (a folder of aligned 256² photos of the subject), fine-tuned 5000 steps:
  python -m visgen_jax.main --config=configs/gen2res_ffhq.py:personal --workdir=W --mode=finetune \
      --config.init_from=base_256.pt --config.data.path=ALBUM
"""

import ml_collections

import adm_ffhq256
from visgen_jax.diffusion import restoration
from visgen_jax.train import config as config_lib


def get_config(arg=None):
  c = adm_ffhq256.get_config()
  c.system = 'gen2res'
  # Fine-tuning as the public finetune.py: AdamW, wd 0, lr 1e-5 annealed linearly to 0, batch 4,
  # uniform timesteps, no P2 weighting, no clipping; 3000 steps on a generative album (5000 on a
  # personal one: the variant :personal). EMA 0.9999 is kept, but restoration uses the raw weights
  # (sample.use_ema).
  c.total_steps = 3000
  c.batch_size = 4
  c.log_every = 100
  c.ckpt_every = 1000
  c.sample_every = 0
  c.optimizer.update(name='adamw', learning_rate=1e-5, schedule='linear', weight_decay=0.0, grad_clip=0.0,
                     ema_decay=0.9999)
  c.diffusion.p2_gamma = 0.0
  c.data.update(name='image_folder', path='', random_flip=False)  # '' = the workdir's generative album
  c.sample.use_ema = False
  c.gen2res = ml_collections.ConfigDict(dict(
      input='',  # the degraded image (album, gen2res), or an image or a folder (restore)
      start_step=restoration.DEFAULT_START_STEP,  # K: the input is diffused to level K-1
      album_size=16,
      guidance_scale=restoration.DEFAULT_GUIDANCE_SCALE,  # λ of the album's skip guidance
      guidance_every=restoration.DEFAULT_GUIDANCE_EVERY,  # n: timesteps t with (t+1) % n == 0 are guided
      restore_guidance_scale=0.0))  # the paper restores without guidance (the public script uses 0.3)
  return config_lib.variant(c, arg, __file__, tiny=tiny, personal=personal)


def personal(c):
  """Fine-tuning on a personal album (config.data.path: the subject's own photos): 5000 steps, as the
  public code does; a generative album gets 3000."""
  c.total_steps = 5000


def tiny(c):
  """CPU-sized: the 32² ADM of adm_ffhq256.py:tiny, a short fine-tune, K = 50."""
  adm_ffhq256.tiny(c)
  c.data.update(name='image_folder', random_flip=False)
  c.total_steps = 20
  c.batch_size = 4
  c.log_every = 5
  c.ckpt_every = 10
  c.sample_every = 0
  c.gen2res.update(start_step=50, album_size=4)
