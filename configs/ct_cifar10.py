"""Consistency training on CIFAR-10: CM (Song et al. 2023) and improved CT (Song & Dhariwal 2023) settings.

    --config configs/ct_cifar10.py        CM's CT. Paper result (CM Table 1, CT with LPIPS): FID 8.70 with 1 step,
                                          5.83 with 2 steps. Settings (CM Table 3, CIFAR-10 CT column): Adam lr 4e-4,
                                          batch 512, N(k) with s0 = 2, s1 = 150, target EMA mu(k) from mu0 = 0.9,
                                          student EMA 0.9999 for sampling, 800k iterations.
    --config configs/ct_cifar10.py:ict    iCT. Paper result (iCT Table 2): FID 2.83 with 1 step, 2.46 with 2 steps
                                          (2.51 / 2.24 for the twice-deeper iCT-deep). Settings (iCT Sec. 3-4):
                                          pseudo-Huber with c = 0.03, lambda = 1/(sigma_{n+1} - sigma_n), lognormal
                                          indices (P_mean -1.1, P_std 2.0), N doubling from s0 = 10 to s1 = 1280, no
                                          EMA target, student EMA 0.99993, dropout 0.3, Adam lr 1e-4, batch 1024,
                                          400k iterations.

Deviations: the papers use the NCSN++ network; this uses configs/ddpm_cifar10.py's DDPM U-Net (35.7M) in CM's
parameterisation, time input 250 ln sigma. CM's CT used LPIPS; l2 here (no LPIPS network in the repo).
"""

import os

from research.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = "cm"):
    if variant not in ("cm", "ict"):
        raise ValueError(f"unknown variant {variant!r}: use 'cm' or 'ict'")
    c = load_config_file(os.path.join(HERE, "ddpm_cifar10.py"))
    c.task = "fewstep"
    c.fewstep.method = "ct"
    c.fewstep.teacher_workdir = ""
    c.optim.warmup_steps = 0
    c.optim.lr_schedule = "constant"
    c.train.ckpt_every = 10_000
    c.train.sample_every = 50_000
    if variant == "cm":
        c.model.dropout = 0.0
        c.fewstep.curriculum = "cm"
        c.fewstep.distance = "l2"
        c.fewstep.weighting = "uniform"
        c.fewstep.index_distribution = "uniform"
        c.fewstep.s0, c.fewstep.s1, c.fewstep.mu0 = 2, 150, 0.9
        c.optim.lr = 4e-4
        c.train.batch_size = 512
        c.train.num_steps = 800_000
        c.train.ema_decay = 0.9999
    else:
        c.model.dropout = 0.3
        c.fewstep.curriculum = "ict"
        c.fewstep.distance = "pseudo_huber"
        c.fewstep.huber_c = 0.03
        c.fewstep.weighting = "ict"
        c.fewstep.index_distribution = "lognormal"
        c.fewstep.p_mean, c.fewstep.p_std = -1.1, 2.0
        c.fewstep.s0, c.fewstep.s1 = 10, 1280
        c.optim.lr = 1e-4
        c.train.batch_size = 1024
        c.train.num_steps = 400_000
        c.train.ema_decay = 0.99993
    return c
