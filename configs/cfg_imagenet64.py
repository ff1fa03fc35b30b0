"""Class-conditional ImageNet 64x64 with the ADM network (Dhariwal & Nichol 2021), for classifier-free guidance
(Ho & Salimans 2022) or for ADM-G's classifier guidance.

    --config configs/cfg_imagenet64.py:cfg   Ho & Salimans: the ADM 64x64 U-Net with a null label; each label is
                                             dropped to it with probability p_uncond = diffusion.cond_drop_prob
                                             (0.1 here; the paper's ImageNet-64 table sweeps 0.1, 0.2 and 0.5 and
                                             guidance w from 0.1 to 4). Sample with --guidance S, S = 1 + w.
    --config configs/cfg_imagenet64.py:adm   ADM's conditional 64x64 model as released (no null label: 295,904,454
                                             parameters, the count of guided-diffusion's create_model with the
                                             flags below); ADM-G guides it with configs/classifier_imagenet64.py
                                             at classifier scale 1.0 (guided-diffusion's README: FID 2.07,
                                             precision 0.74, recall 0.63 at 64x64).

Network: guided-diffusion's 64x64 model flags: num_channels 192, channel_mult 1,2,3,4, num_res_blocks 3,
attention at 32, 16 and 8 with 64 channels per head, scale-shift norm, BigGAN-style resampling residual blocks
(resblock_updown), dropout 0.1, learned sigma (6 output channels). Diffusion: cosine schedule, T = 1000, iDDPM's
hybrid loss (L_simple + 0.001 L_vlb). `python -m research.summary --config configs/cfg_imagenet64.py:adm` prints
the parameter count (tests/test_guidance_configs.py checks both variants against the released code's count).

Optimisation: AdamW-free Adam at lr 1e-4, EMA 0.9999, batch 256 (the values of guided-diffusion's training
command; the paper's own runs used larger batches on many GPUs: scale lr with the batch at your own risk).
Data: TFDS imagenet_resized/64x64 (box-downsampled ImageNet with labels; prepare it with `tfds build`), flips.
"""

from research.config import base_config

VARIANTS = ("cfg", "adm")


def adm64_model(num_classes: int = 1000, null_label: bool = False) -> dict:
    """The ADM 64x64 U-Net's fields (guided-diffusion's MODEL_FLAGS for its 64x64 model)."""
    return dict(
        name="unet",
        ch=192,
        ch_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attn_resolutions=(32, 16, 8),
        num_heads=1,
        head_channels=64,
        dropout=0.1,
        use_scale_shift_norm=True,
        resamp_with_conv=True,
        resblock_updown=True,
        num_classes=num_classes,
        null_label=null_label,
        norm_groups=32,
        norm_eps=1e-5,
        dtype="float32",
    )


def get_config(variant: str = "cfg"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {list(VARIANTS)}")
    c = base_config()
    c.data.name = "tfds"
    c.data.tfds_name = "imagenet_resized/64x64"
    c.data.image_size = 64
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.random_flip = True
    with c.unlocked():
        c.model.update(adm64_model(null_label=variant == "cfg"))
    c.diffusion.schedule = "cosine"
    c.diffusion.timesteps = 1000
    c.diffusion.var_type = "learned_range"
    c.diffusion.loss = "hybrid"
    c.diffusion.vlb_weight = 0.001
    c.diffusion.cond_drop_prob = 0.1 if variant == "cfg" else 0.0
    c.optim.lr = 1e-4
    c.optim.grad_clip = 0.0
    c.train.batch_size = 256
    c.train.num_steps = 540_000
    c.train.ema_decay = 0.9999
    c.sample.steps = "250"
    return c
