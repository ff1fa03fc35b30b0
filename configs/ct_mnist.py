"""Consistency training from scratch (no teacher): task='fewstep', fewstep.method='ct'.

    --config configs/ct_mnist.py           MNIST, improved CT (Song & Dhariwal 2023): pseudo-Huber distance with
                                           c = 0.00054 sqrt(d), 1/(sigma_{n+1} - sigma_n) weights, lognormal pair
                                           indices (P_mean -1.1, P_std 2.0), N doubling from s0=10 to s1=1280, and no
                                           EMA target (the target is stop_gradient(theta))
    --config configs/ct_mnist.py:cm        MNIST, CM's CT (Song et al. 2023, Alg. 3): l2, uniform indices, N(k) with
                                           s0=2, s1=150 and an EMA target with mu(k) from mu0=0.9
    --config configs/ct_mnist.py:digits    8x8 digits, iCT as above, for a few minutes on two CPU cores

The network is configs/ddpm_mnist.py:small's (or the quickstart's) U-Net in CM's parameterisation
f = c_skip x + c_out F(c_in x, 250 ln sigma), randomly initialised. Sampling uses a separate EMA of the student.
"""

import os

from research.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = "mnist"):
    if variant not in ("mnist", "cm", "digits"):
        raise ValueError(f"unknown variant {variant!r}: use 'mnist', 'cm' or 'digits'")
    if variant == "digits":
        c = load_config_file(os.path.join(HERE, "quickstart.py"))
        c.train.num_steps = 2000
        c.optim.lr = 5e-4
        c.optim.warmup_steps = 100
    else:
        c = load_config_file(os.path.join(HERE, "ddpm_mnist.py") + ":small")
        c.train.num_steps = 10_000
        c.optim.lr = 2e-4
        c.optim.warmup_steps = 500
    c.task = "fewstep"
    c.fewstep.method = "ct"
    c.fewstep.teacher_workdir = ""
    if variant == "cm":
        c.fewstep.curriculum = "cm"
        c.fewstep.distance = "l2"
        c.fewstep.weighting = "uniform"
        c.fewstep.index_distribution = "uniform"
        c.fewstep.s0, c.fewstep.s1, c.fewstep.mu0 = 2, 150, 0.9
    else:
        c.fewstep.curriculum = "ict"
        c.fewstep.distance = "pseudo_huber"
        c.fewstep.weighting = "ict"
        c.fewstep.index_distribution = "lognormal"
        c.fewstep.s0, c.fewstep.s1 = 10, 1280
    c.fewstep.sample_steps = 1
    c.optim.lr_schedule = "constant"
    c.model.dropout = 0.0
    c.train.ema_decay = 0.999
    c.train.ema_warmup = True
    c.train.ckpt_every = c.train.num_steps // 2
    c.train.sample_every = c.train.num_steps // 2
    return c
