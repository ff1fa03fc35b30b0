"""Improved DDPM ablations on the 8x8 digits, where the quickstart recipe converges in 2000 steps on 2 CPU cores:

    --config configs/iddpm_digits.py:cosine-hybrid     (default; learned-range variance, L_hybrid)
    --config configs/iddpm_digits.py:linear-simple     (DDPM baseline: fixed-small variance, L_simple)
    any <schedule>-<loss>[-fixedlarge] of configs/iddpm_mnist.py.

The network, optimiser and budget are configs/quickstart.py's (0.70M parameters, 2000 steps at batch 64, cosine
learning-rate decay to zero), with gradients clipped at norm 1 for every variant (L_vlb's gradients spike at small
t). The variants differ only in the diffusion objective, so a sweep over them is the paper's 2x2 ablation on a
converged model (REPRODUCTION.md, "Improved DDPM").
"""

from configs.iddpm_mnist import set_objective
from configs.quickstart import get_config as quickstart_config


def get_config(variant: str = "cosine-hybrid"):
    c = quickstart_config()
    set_objective(c, variant)
    c.optim.grad_clip = 1.0
    c.train.sample_every = 0
    c.sample.sampler = "ddpm"
    c.sample.steps = "100"
    return c
