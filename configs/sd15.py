"""Stable Diffusion v1.5 (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models";
model card: runwayml/stable-diffusion-v1-5).

U-Net (the released unet/config.json, research/models/cond_unet.py): 4 levels of 320, 640, 1280, 1280 channels,
2 ResBlocks per level, cross-attention at the first three levels (CrossAttnDownBlock2D x3 + DownBlock2D,
mirrored), 8 heads per level (diffusers' attention_head_dim=8), 1x1-conv projections, one transformer layer per
block, text from CLIP ViT-L/14's last layer (768 wide, 77 tokens): 859,520,964 parameters.
Latent space: 512x512x3 images -> 64x64x4 latents of the f8 KL autoencoder (scale 0.18215). The workdir
AUTOENCODER_CHECKPOINT is expected to hold the released VAE, imported with

    python -m research.pretrained.convert_vae --diffusers PATH/stable-diffusion-v1-5/vae \
        --workdir runs/autoencoder_sd --image-size 512

Diffusion: T = 1000, "scaled_linear" betas (linear in sqrt(beta)) from 0.00085 to 0.012, eps prediction.
Training (model card): AdamW, lr warmed up to 1e-4 over 10,000 steps then constant, batch 2048, 595k steps at
512x512 (on laion-aesthetics v2 5+, resumed from v1.2), 10% of the captions dropped for classifier-free guidance.
Released weights load with research.pretrained.convert_unet.load_diffusers_unet(PATH/unet).
"""

from ml_collections import ConfigDict

from research.config import base_config
from research.models.clip import stable_diffusion_text_encoder
from research.models.cond_unet import stable_diffusion_unet

AUTOENCODER_CHECKPOINT = "runs/autoencoder_sd"


def get_config(variant: str = "paper") -> ConfigDict:
    """variant 'paper' (the recipe above) or 'fsdp' (the same sharded over every device, frozen text encoder and
    autoencoder included, bfloat16 compute, rematerialised blocks: README "Scale")."""
    if variant not in ("paper", "fsdp"):
        raise ValueError(f"unknown variant {variant!r}: use 'paper' or 'fsdp'")
    c = stable_diffusion("1", image_size=512, prediction="eps", num_steps=595_000)
    if variant == "fsdp":
        c.train.sharding_rules = ((".*", "fsdp"),)
        c.model.dtype = "bfloat16"
        with c.unlocked():
            c.model.remat = "full"
    return c


def stable_diffusion(version: str, *, image_size: int, prediction: str, num_steps: int) -> ConfigDict:
    """The config of a Stable Diffusion release: version '1' (v1.x) or '2' (v2.x) U-Net and text encoder, the
    shared f8 autoencoder, scaled-linear schedule and training recipe (configs/sd21.py builds on it)."""
    c = base_config()
    c.task = "text_to_image"
    # Captioned images (LAION in the paper): a folder with metadata.jsonl (--config.data.data_dir=FOLDER) or TFDS
    # (--config.data.name=tfds --config.data.tfds_name=... --config.data.caption_key=...). Captions are tokenized
    # per batch, so the latents are encoded per batch too (no latent cache).
    c.data.name = "imagefolder"
    c.data.image_size = image_size
    c.data.channels = 3
    c.data.random_flip = False

    c.latent.autoencoder = AUTOENCODER_CHECKPOINT
    c.latent.downsample_factor = 8  # 512x512x3 -> 64x64x4
    c.latent.channels = 4
    c.latent.cache = False

    # diffusers' attention_head_dim counts HEADS: v1 8 per level (40, 80, 160, 160 dims each); v2 (5, 10, 20, 20),
    # 64 dims each.
    with c.unlocked():
        c.model = ConfigDict(dict(name="cond_unet", **stable_diffusion_unet(version)))
    # The text encoder's architecture (research.models.clip.stable_diffusion_text_encoder: v1 CLIP ViT-L/14's text
    # tower, v2 OpenCLIP ViT-H/14's cut to 23 layers), without a padding mask (SD attends all 77 tokens).
    text = stable_diffusion_text_encoder(version)
    c.text.width, c.text.layers, c.text.heads, c.text.act = text["width"], text["layers"], text["heads"], text["act"]
    c.text.context_length, c.text.mask = 77, False

    c.diffusion.schedule = "scaled_linear"
    c.diffusion.timesteps = 1000
    c.diffusion.beta_start = 0.00085
    c.diffusion.beta_end = 0.012
    c.diffusion.prediction = prediction
    c.diffusion.var_type = "fixed_small"
    c.diffusion.loss = "simple"
    c.diffusion.cond_drop_prob = 0.1

    c.optim.optimizer = "adamw"
    c.optim.lr = 1e-4
    c.optim.weight_decay = 1e-2  # torch's AdamW default, which the LDM code keeps
    c.optim.warmup_steps = 10_000
    c.optim.lr_schedule = "constant"
    c.optim.grad_clip = 0.0

    c.train.batch_size = 2048
    c.train.num_steps = num_steps
    c.train.ema_decay = 0.9999
    c.train.ckpt_every = 10_000
    c.train.sample_every = 50_000

    c.sample.sampler = "ddim"
    c.sample.steps = "50"
    c.sample.clip_x0 = False  # latents are not bounded to [-1, 1]
    return c
