"""A small CLIP trained on captioned Fashion-MNIST or MNIST on 2 CPU cores (task='clip').

Captions: the dataset's training templates filled with the class name ("a photo of a sneaker.", "a handwritten
seven.", "the digit 7."), one drawn per example and step; the held-out templates (research/data/text.py) are used
only by the zero-shot evaluation, so its number measures captions the text tower never saw.

    --config configs/clip_fashion.py:fashion_mnist   (default)
    --config configs/clip_fashion.py:mnist
    --config configs/clip_fashion.py:siglip          Fashion-MNIST with SigLIP's sigmoid loss (t' = log 10, b = -10)

Model: the 'tiny' architecture of research/models/clip.py with 4x4 patches (49 image tokens): both towers width
128, 4 layers of 4 heads, 16-token captions of the CLIP vocabulary, embed_dim 128. Recipe: AdamW (weight decay 0.1,
betas 0.9 / 0.98, eps 1e-6 as CLIP), 200 warmup steps then cosine decay, batch 256, 2000 steps on Fashion-MNIST
(1000 on MNIST), random translation by 2 pixels, no EMA; the zero-shot check every 250 steps draws the learning
curve.

    python -m research.train --config configs/clip_fashion.py --workdir runs/clip_fashion
    python -m research.evaluate zeroshot --workdir runs/clip_fashion
"""

import ml_collections

from research.config import base_config
from research.models.clip import named_architecture

VARIANTS = ("fashion_mnist", "mnist", "siglip")


def get_config(variant: str = "fashion_mnist"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {list(VARIANTS)}")
    c = base_config()
    c.task = "clip"
    c.data.name = "mnist" if variant == "mnist" else "fashion_mnist"
    c.data.image_size = 28
    c.data.channels = 1
    c.data.num_classes = 10
    model = dict(name="clip", **named_architecture("tiny"))
    model.update(patch_size=4, logit_bias_init=None, dtype="float32")
    c.clip.loss = "clip"
    if variant == "siglip":
        c.clip.loss = "siglip"
        model.update(logit_scale_init=2.302585092994046, logit_bias_init=-10.0)  # log 10, -10 (big_vision)
    c.model = ml_collections.ConfigDict(model)
    c.clip.shift = 2
    c.clip.eval_num = 2000
    c.optim.optimizer = "adamw"
    c.optim.lr = 1e-3
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 200
    c.optim.lr_schedule = "cosine"
    c.optim.grad_clip = 1.0
    c.train.batch_size = 256
    c.train.num_steps = 1000 if variant == "mnist" else 2000
    c.train.ema_decay = 0.0
    c.train.log_every = 50
    c.train.ckpt_every = 500
    c.train.sample_every = 250
    return c
