"""DDPM on CIFAR-10 (Ho et al. 2020, Sec. 4 and Appendix B): the paper's 35.7M-parameter U-Net and recipe.

Model: ch 128, multipliers (1, 2, 2, 2), 2 res blocks per level, self-attention at 16x16, dropout 0.1.
Diffusion: T = 1000, linear betas 1e-4 .. 0.02, eps prediction, fixed-small variance (sigma^2 = beta~).
Training: Adam lr 2e-4, batch 128, 5000 warmup steps, grad clip 1, EMA 0.9999, 800k steps, random flips.
Paper result: FID 3.17, IS 9.46 (Table 1). Needs the CIFAR-10 python batches in $RESEARCH_DATA_DIR/cifar10.
"""

from research.config import base_config


def get_config():
    c = base_config()
    c.data.name = "cifar10"
    c.data.image_size = 32
    c.data.channels = 3
    c.data.random_flip = True

    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.1

    c.diffusion.schedule = "linear"
    c.diffusion.timesteps = 1000
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02

    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.grad_clip = 1.0

    c.train.batch_size = 128
    c.train.num_steps = 800_000
    c.train.ema_decay = 0.9999
    c.train.ckpt_every = 10_000
    c.train.sample_every = 50_000
    return c
