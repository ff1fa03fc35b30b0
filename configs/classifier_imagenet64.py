"""ADM-G's noise-aware ImageNet 64x64 classifier (Dhariwal & Nichol 2021; task='noisy_classifier').

Network: guided-diffusion's 64x64 classifier flags: classifier_width 128, classifier_depth 4 (residual blocks per
level), channel_mult 1,2,3,4, attention at 32, 16 and 8 with 64 channels per head, scale-shift norm, BigGAN-style
resampling blocks, attention pooling to 1000 logits: 65,438,568 parameters, the count of guided-diffusion's
create_classifier with those flags (tests/test_guidance_configs.py checks ours against it).
Training: guided-diffusion's classifier command: AdamW lr 3e-4 annealed linearly to 0, weight decay 0.05, batch
256, 300K iterations, on x_t at uniform random t of the diffusion run's schedule (cosine, T = 1000, the schedule of
configs/cfg_imagenet64.py:adm, which it guides at scale 1.0).

    python -m research.train --config configs/classifier_imagenet64.py --workdir runs/clf_imagenet64
    python -m research.sample --workdir runs/adm_imagenet64 --classifier runs/clf_imagenet64 --classifier-scale 1
"""

import ml_collections

from research.config import base_config


def get_config():
    c = base_config()
    c.task = "noisy_classifier"
    c.data.name = "tfds"
    c.data.tfds_name = "imagenet_resized/64x64"
    c.data.image_size = 64
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.random_flip = True
    c.diffusion.schedule = "cosine"
    c.diffusion.timesteps = 1000
    c.optim.optimizer = "adamw"
    c.optim.weight_decay = 0.05
    c.optim.lr = 3e-4
    c.optim.lr_schedule = "linear"
    c.optim.grad_clip = 0.0
    c.train.batch_size = 256
    c.train.num_steps = 300_000
    c.train.ema_decay = 0.0
    c.train.sample_every = 0  # a classifier has no preview
    c.model = ml_collections.ConfigDict(
        dict(
            name="half_unet",
            num_classes=1000,
            ch=128,
            ch_mult=(1, 2, 3, 4),
            num_res_blocks=4,
            attn_resolutions=(32, 16, 8),
            num_heads=1,
            head_channels=64,
            dropout=0.0,
            use_scale_shift_norm=True,
            resamp_with_conv=True,
            resblock_updown=True,
            pool="attention",
            norm_groups=32,
            norm_eps=1e-5,
            dtype="float32",
        )
    )
    return c
