"""Latent against pixel diffusion at equal training compute on the 8x8 digits (Rombach et al. 2022, Fig. 7).

One backbone, two spaces: the class-conditional DiT of configs/dit_mnist_latent.py:digits (depth 4, width 128,
patch 1, learned sigma with the hybrid loss, 10% null labels) trained either on the pixels (8x8x1: 64 tokens) or on
the 4x4x4 latents of the f = 2 KL autoencoder configs/vae_mnist.py:digits (16 tokens, a quarter of the tokens and
about a quarter of the FLOPs per step). Everything else is equal: schedule, loss, optimiser (a constant rate here),
batch, EMA, sampler (DDIM 50, no guidance); the latent model trains 8000 steps, the pixel one 2000 (the same
compute). The sweep evaluates every kept checkpoint, so FID can be read against steps and against training FLOPs
(`python -m experiments.latent_vs_pixel --sweep runs/sweep_ldm_digits` pairs them at equal compute):

    python -m research.train --config configs/vae_mnist.py:digits --workdir runs/vae_digits     # stage 1 (latent)
    python -m experiments.sweep --config configs/ldm_digits.py --grid variant=pixel,latent --seeds 0,1,2 \\
        --set train.progress=false --eval fid_domain --curve --out runs/sweep_ldm_digits

    --config configs/ldm_digits.py:latent   the latent model (needs runs/vae_digits, or --config.latent.autoencoder)
    --config configs/ldm_digits.py:pixel    the same DiT on the pixels
"""

from configs import dit_mnist_latent


def get_config(variant: str = "latent"):
    if variant not in ("latent", "pixel"):
        raise ValueError(f"unknown variant {variant!r}: use 'latent' or 'pixel'")
    c = dit_mnist_latent.get_config("digits")
    # A constant rate after the warmup, so that the checkpoint at step k is a run of k steps: the curves of the two
    # spaces can be compared at any equal compute, not only where their decays end.
    c.optim.lr_schedule = "constant"
    c.train.ckpt_every = 500
    c.train.keep_checkpoints = 16
    c.train.sample_every = 0
    # The pixel model costs 4.1x as much per step (64 tokens against 16): 2000 pixel steps and 8000 latent steps
    # spend the same compute (43 TFLOP), so the two curves cover one compute range.
    c.train.num_steps = 8000 if variant == "latent" else 2000
    if variant == "pixel":
        c.latent.autoencoder = ""
        c.latent.downsample_factor = 0
        c.latent.channels = 0
        c.latent.cache = False
    return c
