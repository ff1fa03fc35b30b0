"""ControlNet on MNIST (Zhang, Rao & Agrawala 2023 at a scale that converges on 2 CPU cores): edge-map control of a
class-conditional pixel-space U-Net.

    --config configs/controlnet_mnist.py:base   the base model: a class-conditional U-Net (16 channels, levels
                                                (1, 2, 2), no attention, 268,017 parameters) with 10% label dropout,
                                                4000 steps at batch 64 (about 30 min on 2 cores)
    --config configs/controlnet_mnist.py        its ControlNet (task 'controlnet'): the base run (controlnet.base,
                                                default runs/controlnet_mnist_base) frozen, a trainable copy of its
                                                encoder and middle block plus a hint encoder, Canny edges of the
                                                training image as the hint, 50% of the labels dropped (the paper
                                                drops half the prompts), 3000 steps

Train the base, then the ControlNet, then measure controllability (experiments/controlnet_demo.py):

    python -m research.train --config configs/controlnet_mnist.py:base --workdir runs/controlnet_mnist_base
    python -m research.train --config configs/controlnet_mnist.py --workdir runs/controlnet_mnist
"""

from ml_collections import ConfigDict

from research.config import base_config

BASE_WORKDIR = "runs/controlnet_mnist_base"


def base_unet(c):
    c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 16, (1, 2, 2), 1
    c.model.attn_resolutions, c.model.dropout, c.model.norm_groups = (), 0.0, 8
    c.model.num_classes, c.model.null_label = 10, True


def get_config(variant: str = "control"):
    if variant not in ("base", "control"):
        raise ValueError(f"unknown variant {variant!r}: use 'base' (the class-conditional U-Net) or 'control'")
    c = base_config()
    c.data.name, c.data.image_size, c.data.num_classes = "mnist", 28, 10
    c.diffusion.schedule = "cosine"
    c.diffusion.timesteps = 1000
    c.train.batch_size = 64
    c.train.log_every = 50
    c.train.ema_decay = 0.995
    c.train.ema_warmup = True
    c.sample.num = 100
    c.sample.steps = "50"
    if variant == "base":
        base_unet(c)
        c.diffusion.cond_drop_prob = 0.1
        c.optim.lr, c.optim.warmup_steps, c.optim.lr_schedule, c.optim.grad_clip = 1e-3, 200, "cosine", 1.0
        c.train.num_steps, c.train.ckpt_every, c.train.sample_every = 4000, 1000, 1000
        return c
    c.task = "controlnet"
    c.controlnet.base = BASE_WORKDIR
    c.controlnet.hint = "canny"
    # The control's architecture is the base's (copied from the base run's config.json when the run starts) plus
    # the hint encoder: the hint is at the U-Net's own resolution, so no strided step (hint_downsample=1).
    with c.unlocked():
        c.model = ConfigDict(
            dict(name="unet_controlnet", hint_channels=(16, 32), hint_downsample=1, conditioning_channels=1)
        )
    c.diffusion.cond_drop_prob = 0.5
    c.optim.optimizer = "adamw"
    c.optim.lr, c.optim.warmup_steps, c.optim.lr_schedule, c.optim.grad_clip = 1e-4, 100, "constant", 1.0
    c.optim.weight_decay = 0.0
    # A preview (and an edge-F1 line in RUN/control.jsonl) every 100 steps draws the convergence curve.
    c.train.num_steps, c.train.ckpt_every, c.train.sample_every, c.train.keep_checkpoints = 3000, 500, 100, 10
    return c
