"""Noise-aware classifiers for classifier guidance (Dhariwal & Nichol 2021): ADM's half U-Net with attention pooling,
trained with cross-entropy on x_t = q_sample(x0, t, eps) at uniform random t (task='noisy_classifier').

    --config configs/classifier_mnist.py:digits  scikit-learn's 8x8 digits (no files); 2000 steps at batch 64, a
                                                 few minutes on 2 CPU cores
    --config configs/classifier_mnist.py:mnist   MNIST 28x28, the encoder of configs/cfg_mnist.py:mnist's U-Net;
                                                 6000 steps at batch 64

The schedule (cosine, T=1000) is the one of configs/quickstart.py and configs/cfg_mnist.py: a classifier only guides
a diffusion run trained on the same schedule, because it is called at that run's timesteps on its noise levels.
The unconditional diffusion run that ':digits' guides is configs/quickstart.py (digits, cosine, T=1000); the runs
of configs/cfg_mnist.py are class-conditional (they can be guided too, by both guidance kinds at once).

    python -m research.train --config configs/classifier_mnist.py:digits --workdir runs/clf_digits
    python -m research.sample --workdir runs/quickstart --classifier runs/clf_digits --classifier-scale 2
"""

import ml_collections

from research.config import base_config

VARIANTS = ("digits", "mnist")


def get_config(variant: str = "digits"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {list(VARIANTS)}")
    c = base_config()
    c.task = "noisy_classifier"
    c.data.num_classes = 10
    c.diffusion.schedule = "cosine"
    c.diffusion.timesteps = 1000
    # ADM trains its classifiers with AdamW (weight decay 0.05) and no EMA; the EMA kept here is what sampling reads
    # by default, with a short warmup so it tracks a short run.
    c.optim.optimizer = "adamw"
    c.optim.weight_decay = 0.05
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.lr_schedule = "cosine"
    c.train.batch_size = 64
    c.train.ema_decay = 0.995
    c.train.ema_warmup = True
    c.train.log_every = 50
    c.train.sample_every = 0  # a classifier has no preview
    model = dict(
        name="half_unet",
        num_classes=10,
        ch=32,
        num_res_blocks=1,
        num_heads=1,
        head_channels=-1,
        dropout=0.0,
        use_scale_shift_norm=True,
        resamp_with_conv=True,
        pool="attention",
        norm_eps=1e-6,
        dtype="float32",
    )
    if variant == "digits":
        c.data.name, c.data.image_size = "digits", 8
        model.update(ch_mult=(1, 2), attn_resolutions=(4,), norm_groups=8)
        c.train.num_steps, c.train.ckpt_every = 2000, 1000
    else:
        c.data.name, c.data.image_size = "mnist", 28
        model.update(ch_mult=(1, 2, 2), attn_resolutions=(7,), num_heads=2, norm_groups=16)
        c.train.num_steps, c.train.ckpt_every = 6000, 1000
    c.model = ml_collections.ConfigDict(model)
    return c
