"""DDPM on MNIST (28x28): the CIFAR-10 recipe of Ho et al. 2020 scaled to a small grayscale set.

28 = 4 * 7, so three resolution levels (28, 14, 7) with attention at 14x14. Reads the IDX files from
$RESEARCH_DATA_DIR/mnist (or --config.data.data_dir). Set --config.data.name=fashion_mnist for Fashion-MNIST.

    --config configs/ddpm_mnist.py          the recipe above (6.5M parameters, 50k steps at batch 128)
    --config configs/ddpm_mnist.py:small    the same diffusion with a 1.1M-parameter U-Net (ch 32, one res block
                                            per level, attention at 7x7) and a CPU budget: 3000 steps at batch 64
                                            (about 45 min on 2 cores). The model the sampler comparison in the
                                            README was run on.
"""

from research.config import base_config


def get_config(variant: str = "paper"):
    if variant not in ("paper", "small"):
        raise ValueError(f"unknown variant {variant!r}: use 'paper' or 'small'")
    c = base_config()
    c.data.name = "mnist"
    c.data.image_size = 28
    c.data.channels = 1

    c.model.ch = 64
    c.model.ch_mult = (1, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (14,)
    c.model.dropout = 0.1

    c.diffusion.schedule = "linear"
    c.diffusion.timesteps = 1000

    c.optim.lr = 2e-4
    c.optim.warmup_steps = 1000

    c.train.batch_size = 128
    c.train.num_steps = 50_000
    c.train.ema_decay = 0.999
    c.train.log_every = 100
    c.train.ckpt_every = 5000
    c.train.sample_every = 5000
    if variant == "small":
        c.model.ch = 32
        c.model.num_res_blocks = 1
        c.model.attn_resolutions = (7,)
        c.model.num_heads = 2
        c.model.dropout = 0.0
        c.model.norm_groups = 16
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 100
        c.optim.lr_schedule = "cosine"
        c.optim.grad_clip = 1.0
        c.train.batch_size = 64
        c.train.num_steps = 3000
        c.train.ema_warmup = True
        c.train.log_every = 50
        c.train.ckpt_every = 500
        c.train.sample_every = 1000
    return c
