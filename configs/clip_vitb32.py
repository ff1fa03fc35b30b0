"""OpenAI CLIP ViT-B/32 (Radford et al. 2021): the architecture and training recipe of the paper.

Architecture (the paper's CLIP-ViT hyperparameters; transformers' openai/clip-vit-base-patch32): 224x224 images in
32x32 patches, vision transformer width 768, 12 layers, 12 heads; text transformer width 512, 12 layers, 8 heads,
77 tokens of the 49,408-token BPE vocabulary, causal mask, pooled at the end token; quick-GELU; joint embedding
512; learned temperature initialised at 1/0.07 and clipped at 100. 151,277,313 parameters (`python -m
research.summary --config configs/clip_vitb32.py`; the count of transformers' CLIPModel for this config, checked
in tests/test_clip_model.py).

Recipe (Sec. 2.5 and the common hyperparameters): AdamW, decoupled weight decay 0.2 (not on gains, biases or the
temperature), betas 0.9 / 0.98, eps 1e-6, lr 5e-4 with cosine decay, 2000 warmup iterations, batch 32,768, 32
epochs over 400M pairs (about 390K steps). The paper's data (WIT-400M) is not public, and this codebase has no
image-text source yet: `research.summary` describes the model, training needs a captioned dataset. Loading the
released weights instead: research/pretrained/convert_clip.py (a local Hugging Face folder).
"""

import ml_collections

from research.config import base_config
from research.models.clip import named_architecture


def get_config():
    c = base_config()
    c.task = "clip"
    c.data.name = "tfds"
    c.data.image_size = 224
    c.data.channels = 3
    c.data.random_flip = False
    c.model = ml_collections.ConfigDict(dict(name="clip", **named_architecture("ViT-B/32"), dtype="float32"))
    c.clip.loss = "clip"
    c.optim.optimizer = "adamw"
    c.optim.lr = 5e-4
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.weight_decay = 0.2
    c.optim.decay_matrices_only = True  # "applied to all weights that are not gains or biases"
    c.optim.warmup_steps = 2000
    c.optim.lr_schedule = "cosine"
    c.optim.grad_clip = 0.0
    c.train.batch_size = 32_768
    c.train.num_steps = 390_000
    c.train.ema_decay = 0.0
    return c
