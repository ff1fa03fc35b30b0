"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021): the paper's L_hybrid recipe (Sec. 3-4, Appendix A).

Model: ch 128, multipliers (1, 2, 2, 2), 3 res blocks per level, attention at 16x16 and 8x8 with 4 heads,
scale-shift norm (the improved-diffusion U-Net), dropout 0.3, learned-range variance (2x output channels).
Diffusion: T = 4000, cosine schedule (s = 0.008, betas clipped at 0.999), L_hybrid = L_simple + 0.001 L_vlb.
Training: Adam lr 1e-4, batch 128, EMA 0.9999, 500k steps, no warmup. Paper: NLL 2.94 bits/dim and FID 2.90
with 4000 steps (Table 2 and Sec. 4). Needs the CIFAR-10 python batches in $RESEARCH_DATA_DIR/cifar10.
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
    c.model.num_res_blocks = 3
    c.model.attn_resolutions = (16, 8)
    c.model.num_heads = 4
    c.model.use_scale_shift_norm = True
    c.model.dropout = 0.3

    c.diffusion.schedule = "cosine"
    c.diffusion.timesteps = 4000
    c.diffusion.var_type = "learned_range"
    c.diffusion.loss = "hybrid"
    c.diffusion.vlb_weight = 0.001

    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.grad_clip = 1.0

    c.train.batch_size = 128
    c.train.num_steps = 500_000
    c.train.ema_decay = 0.9999
    c.train.ckpt_every = 10_000
    c.train.sample_every = 50_000

    c.sample.sampler = "ddpm"
    c.sample.steps = "4000"
    return c
