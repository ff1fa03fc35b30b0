"""Latent diffusion on MNIST: a small class-conditional DiT on the 7x7x4 latents of configs/vae_mnist.py.

The two stages of Rombach et al. (2022) with the DiT backbone of Peebles & Xie (2023), sized for two CPU cores:

    python -m research.train --config configs/vae_mnist.py --workdir runs/vae_mnist          # stage 1
    python -m research.train --config configs/dit_mnist_latent.py --workdir runs/dit_mnist    # stage 2
    python -m research.sample --workdir runs/dit_mnist --num 100                              # decoded digits

Stage 2 encodes the 60,000 training images once (posterior mean and std, scaled by the autoencoder's stored
latent scale) into runs/vae_mnist/latent_cache and draws z ~ q(z|x) from that cache every step
(--config.latent.cache=false encodes every batch instead). The latents are standardised per channel
(latent.normalization='channel'): this autoencoder's four channels sit at offsets of -0.8 to +1.5 (in units of
the global scale) with spreads of only 0.26-0.46, so the global 1/std of Stable Diffusion's recipe leaves the
digits' variation at about a third of unit scale; with it, 2000 steps gave strokes, not digits.
--config.latent.autoencoder points at another autoencoder run; --config.data.name=fashion_mnist with an
autoencoder trained on Fashion-MNIST gives clothes.

--config configs/dit_mnist_latent.py:digits is the same recipe on scikit-learn's 8x8 digits (stage 1:
configs/vae_mnist.py:digits into runs/vae_digits, 4x4x4 latents, 16 tokens), 2000 steps: minutes on two cores.

Model: DiT with adaLN-Zero, patch size 1 on the 7x7 latent grid (7 is prime, so the paper's p = 2 cannot tile
it; 49 tokens, as many as DiT-XL/4 sees at 256px), depth 4, width 128, 4 heads (1.2M parameters), 10 classes
plus a null label (labels dropped to it with probability 0.1 in training, for classifier-free guidance), learned
sigma (8 output channels) trained with iDDPM's hybrid loss as in the paper. The paper's T = 1000 linear
schedule. Optimiser: AdamW without weight decay as in the paper, but at a small-budget rate (1e-3 with 200
warmup steps and cosine decay instead of a constant 1e-4) and EMA 0.999 with warmup instead of 0.9999, since
4000 steps at batch 64 is 1/100 of the paper's shortest run.
Sampling: DDIM 50 steps, eta 0, no x0 clipping (latents are unbounded), decoded by the autoencoder.
"""

from ml_collections import ConfigDict

from research.config import base_config
from research.models.dit import dit_model_config

AUTOENCODER = "runs/vae_mnist"


def get_config(variant: str = "mnist") -> ConfigDict:
    if variant not in ("mnist", "digits"):
        raise ValueError(f"unknown variant {variant!r}: use 'mnist' or 'digits'")
    c = base_config()
    c.data.name = "mnist"
    c.data.image_size = 28
    c.data.channels = 1
    c.data.num_classes = 10

    c.latent.autoencoder = AUTOENCODER
    c.latent.downsample_factor = 4
    c.latent.channels = 4
    c.latent.cache = True
    c.latent.normalization = "channel"

    with c.unlocked():
        c.model = dit_model_config(
            "", depth=4, hidden_size=128, num_heads=4, patch_size=1, num_classes=10, null_label=True
        )

    c.diffusion.schedule = "linear"
    c.diffusion.timesteps = 1000
    c.diffusion.prediction = "eps"
    c.diffusion.var_type = "learned_range"
    c.diffusion.loss = "hybrid"
    c.diffusion.vlb_weight = 0.001
    c.diffusion.cond_drop_prob = 0.1  # classifier-free guidance training (the paper: 10% null labels)

    c.optim.optimizer = "adamw"
    c.optim.weight_decay = 0.0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.lr_schedule = "cosine"
    c.optim.grad_clip = 1.0

    c.train.batch_size = 64
    c.train.num_steps = 4000
    c.train.ema_decay = 0.999
    c.train.ema_warmup = True
    c.train.log_every = 50
    c.train.ckpt_every = 1000
    c.train.sample_every = 1000
    c.train.keep_checkpoints = 4

    c.sample.sampler = "ddim"
    c.sample.steps = "50"
    c.sample.eta = 0.0
    c.sample.clip_x0 = False
    c.sample.num = 100

    if variant == "digits":  # the same recipe on the 4x4x4 latents of configs/vae_mnist.py:digits (8x8 digits)
        c.data.name = "digits"
        c.data.image_size = 8
        c.latent.autoencoder = "runs/vae_digits"
        c.latent.downsample_factor = 2
        c.train.num_steps = 2000
        c.train.ckpt_every = 1000
    return c
