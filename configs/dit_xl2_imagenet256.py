"""DiT-XL/2 on ImageNet 256x256 latents (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Model (Sec. 3, Table 1): DiT-XL/2, depth 28, hidden 1152, 16 heads, patch 2, adaLN-Zero, 1000 classes plus a
null label (labels dropped to it with probability 0.1 in training, for classifier-free guidance); 675M
parameters and 118.6 Gflops (Table 4; the paper's Gflops count multiply-adds, `python -m research.summary`
prints both conventions).
Latent space (Sec. 3.1): images 256x256x3 -> 32x32x4 latents of a pretrained f8 KL autoencoder (the Stable
Diffusion VAE, sd-vae-ft-ema / -mse), latents scaled by 0.18215; the network never sees pixels.
Diffusion (Sec. 3.1, 4): T = 1000, linear betas 1e-4..0.02, learned covariance (learned_range, 2x4 output
channels) trained with iDDPM's L_simple + L_vlb: vlb_weight 0.001 times T = 1000 terms gives the plain
sum the paper's code uses.
Training (Sec. 4): AdamW lr 1e-4 constant, no weight decay, no warmup, no gradient clipping, batch 256,
EMA 0.9999, horizontal flips. Table 4 compares models at 400K steps; the final DiT-XL/2 (Table 2, FID 2.27
with cfg 1.5) trained for 7M steps, used here. Sampling: 250 DDPM steps, no clipping of x0 (latents are not
bounded to [-1, 1]).

Other sizes: `--config.model.variant=DiT-B/4` (any of DiT-{S,B,L,XL}/{2,4,8}).

Latent pipeline: config.data describes the 256x256 RGB images; latent.autoencoder names the autoencoder workdir
(task='autoencoder', f8, 4 latent channels, the geometry declared below and checked at start-up) whose scaled
latents the DiT trains on; the training split is encoded once into a latent cache. AUTOENCODER_CHECKPOINT is
where that workdir is expected. The paper's autoencoder, from a local diffusers copy of sd-vae-ft-ema:

    python -m research.pretrained.convert_vae --diffusers PATH/sd-vae-ft-ema --workdir runs/autoencoder_f8_imagenet256 \
        --image-size 256 --data-name tfds --tfds-name imagenet2012        # scale 0.18215 from its config

or train one with the autoencoder task at f8 (four ch_mult levels, z_channels 4), or set
--config.latent.autoencoder. The summary command needs only the declared geometry.
"""

from ml_collections import ConfigDict

from research.config import base_config
from research.models.dit import dit_model_config

# The workdir of the f8, 4-channel KL autoencoder that produces the latents (the paper uses the Stable Diffusion
# VAE, whose latent scale is 0.18215; an autoencoder trained here stores its own in latent_scale.json).
AUTOENCODER_CHECKPOINT = "runs/autoencoder_f8_imagenet256"
IMAGE_SIZE = 256
LATENT_DOWNSAMPLING = 8


def get_config(variant: str = "paper") -> ConfigDict:
    """variant 'paper' (the recipe above) or 'fsdp' (the same, sharded over every device in bfloat16 with
    rematerialised blocks: research/train/mesh.py, README "Scale")."""
    if variant not in ("paper", "fsdp"):
        raise ValueError(f"unknown variant {variant!r}: use 'paper' or 'fsdp'")
    c = base_config()
    c.data.name = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.data.image_size = IMAGE_SIZE
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.random_flip = True

    c.latent.autoencoder = AUTOENCODER_CHECKPOINT
    c.latent.downsample_factor = LATENT_DOWNSAMPLING  # 256x256x3 -> 32x32x4
    c.latent.channels = 4
    c.latent.cache = False  # flips are applied to pixels and encoded every step (the cache holds unflipped images)

    with c.unlocked():
        c.model = dit_model_config("DiT-XL/2", num_classes=1000, null_label=True)

    c.diffusion.schedule = "linear"
    c.diffusion.timesteps = 1000
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.prediction = "eps"
    c.diffusion.var_type = "learned_range"
    c.diffusion.loss = "hybrid"
    c.diffusion.vlb_weight = 0.001
    c.diffusion.cond_drop_prob = 0.1  # classifier-free guidance training (the paper: 10% null labels)

    c.optim.optimizer = "adamw"
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.optim.lr_schedule = "constant"
    c.optim.grad_clip = 0.0

    c.train.batch_size = 256
    c.train.num_steps = 7_000_000
    c.train.ema_decay = 0.9999
    c.train.ckpt_every = 50_000
    c.train.sample_every = 100_000

    c.sample.sampler = "ddpm"
    c.sample.steps = "250"
    c.sample.clip_x0 = False
    if variant == "fsdp":
        c.train.sharding_rules = ((".*", "fsdp"),)  # frozen parts included: their paths are frozen/<part>/...
        c.model.dtype = "bfloat16"
        c.model.remat = "full"
    return c
