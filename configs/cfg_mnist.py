"""Class-conditional U-Nets trained for classifier-free guidance (Ho & Salimans 2022): each example's label is
replaced by the null label with probability diffusion.cond_drop_prob (the paper's p_uncond, 0.1 or 0.2 in its
ImageNet-64 table), so one network gives both eps(x, c) and eps(x, null).

    --config configs/cfg_mnist.py:digits         scikit-learn's 8x8 digits (no files), the quickstart U-Net with 10
                                                 classes + the null label; 3000 steps at batch 64 on 2 CPU cores
    --config configs/cfg_mnist.py:mnist          MNIST 28x28, the small U-Net of configs/ddpm_mnist.py:small with
                                                 labels; 6000 steps at batch 64
    --config configs/cfg_mnist.py:fashion_mnist  the same on Fashion-MNIST (p_uncond 0.2)

Sample with guidance: `python -m research.sample --workdir RUN --guidance 2.0` (diffusers' scale s = 1 + w).
"""

from research.config import base_config

VARIANTS = ("digits", "mnist", "fashion_mnist")


def get_config(variant: str = "digits"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {list(VARIANTS)}")
    c = base_config()
    c.model.num_classes = 10
    c.model.null_label = True
    c.data.num_classes = 10
    c.diffusion.cond_drop_prob = 0.1
    c.diffusion.schedule = "cosine"
    c.diffusion.timesteps = 1000
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.lr_schedule = "cosine"
    c.train.batch_size = 64
    c.train.ema_decay = 0.995
    c.train.ema_warmup = True
    c.train.log_every = 50
    c.sample.num = 100
    c.sample.steps = "50"
    if variant == "digits":
        c.data.name, c.data.image_size = "digits", 8
        c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 32, (1, 2), 1
        c.model.attn_resolutions, c.model.dropout, c.model.norm_groups = (4,), 0.0, 8
        c.train.num_steps, c.train.ckpt_every, c.train.sample_every = 3000, 1000, 1000
    else:
        c.data.name, c.data.image_size = variant, 28
        c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 32, (1, 2, 2), 1
        c.model.attn_resolutions, c.model.num_heads, c.model.dropout, c.model.norm_groups = (7,), 2, 0.0, 16
        c.optim.grad_clip = 1.0
        c.train.num_steps, c.train.ckpt_every, c.train.sample_every = 6000, 1000, 1000
        if variant == "fashion_mnist":
            c.diffusion.cond_drop_prob = 0.2
    return c
