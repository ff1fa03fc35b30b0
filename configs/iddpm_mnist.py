"""Improved DDPM ablations on MNIST (Nichol & Dhariwal 2021, Sec. 3), one file with named variants:

    --config configs/iddpm_mnist.py:cosine-hybrid      (default; learned-range variance, L_hybrid)
    --config configs/iddpm_mnist.py:linear-simple      (DDPM baseline: fixed-small variance, L_simple)
    --config configs/iddpm_mnist.py:cosine-vlb         (learned variance, L_vlb, importance-sampled t)
    any of {linear, cosine} x {simple, hybrid, vlb}; append -fixedlarge to a 'simple' variant for sigma^2=beta.

'simple' trains a fixed variance (fixed_small unless -fixedlarge); 'hybrid' and 'vlb' learn the variance
(learned_range). The U-Net is small so the 2x2 grid of experiments/iddpm_ablation.py fits a CPU budget.
"""

from research.config import base_config

SCHEDULES = ("linear", "cosine")
LOSSES = ("simple", "hybrid", "vlb")


def set_objective(c, variant: str):
    """Set the diffusion schedule, loss, variance and t-sampling of config `c` from `<schedule>-<loss>[-fixedlarge]`
    (shared with configs/iddpm_digits.py)."""
    parts = variant.split("-")
    if (
        len(parts) not in (2, 3)
        or parts[0] not in SCHEDULES
        or parts[1] not in LOSSES
        or (len(parts) == 3 and (parts[2] != "fixedlarge" or parts[1] != "simple"))
    ):
        raise ValueError(
            f"unknown variant {variant!r}: use <schedule>-<loss>[-fixedlarge] with schedule in "
            f"{SCHEDULES} and loss in {LOSSES}"
        )
    schedule, loss = parts[0], parts[1]
    c.diffusion.schedule = schedule
    c.diffusion.timesteps = 1000
    c.diffusion.loss = loss
    c.diffusion.var_type = (
        "learned_range" if loss in ("hybrid", "vlb") else ("fixed_large" if len(parts) == 3 else "fixed_small")
    )
    c.diffusion.t_sampling = "importance" if loss == "vlb" else "uniform"
    return c


def get_config(variant: str = "cosine-hybrid"):
    c = base_config()
    c.data.name = "mnist"
    c.data.image_size = 28
    c.data.channels = 1

    c.model.ch = 32
    c.model.ch_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (7,)
    c.model.num_heads = 2
    c.model.use_scale_shift_norm = True
    c.model.dropout = 0.0
    c.model.norm_groups = 16

    set_objective(c, variant)

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.lr_schedule = "cosine"
    c.optim.grad_clip = 1.0

    c.train.batch_size = 64
    c.train.num_steps = 3000
    c.train.ema_decay = 0.999
    c.train.ema_warmup = True
    c.train.log_every = 50
    c.train.ckpt_every = 1000
    c.train.sample_every = 0

    c.sample.sampler = "ddpm"
    c.sample.steps = "100"
    return c
