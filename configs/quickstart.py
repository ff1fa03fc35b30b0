"""Quickstart: a small DDPM on scikit-learn's 8x8 digits (no files needed); trains and samples in minutes on
two CPU cores. Samples are drawn with 50-step DDIM from the EMA parameters."""

from research.config import base_config


def get_config():
    c = base_config()
    c.data.name = "digits"
    c.data.image_size = 8
    c.data.channels = 1

    c.model.ch = 32
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.dropout = 0.0
    c.model.norm_groups = 8

    c.diffusion.schedule = "cosine"
    c.diffusion.timesteps = 1000

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.lr_schedule = "cosine"

    c.train.batch_size = 64
    c.train.num_steps = 2000
    c.train.ema_decay = 0.995
    c.train.ema_warmup = True
    c.train.log_every = 50
    c.train.ckpt_every = 1000
    c.train.sample_every = 1000

    c.sample.num = 100
    c.sample.steps = "50"
    return c
