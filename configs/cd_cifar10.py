"""Consistency distillation on CIFAR-10 with the published settings of Song et al. (2023, "Consistency Models").

Paper result (Table 1, CIFAR-10, CD with LPIPS): FID 3.55 with 1 step, 2.93 with 2 steps.
Settings (CM Table 3, CIFAR-10 CD column): Adam lr 4e-4, batch 512, N = 18, Heun solver, target EMA mu = 0
(0.95 on the 64x64 / LSUN sets), EMA of the student for sampling 0.9999, 800k iterations, no dropout.

Deviations: the paper distils an EDM teacher and measures distance with LPIPS; here the teacher is this repo's DDPM
(configs/ddpm_cifar10.py, eps, linear betas, runs/ddpm_cifar10), read as a sigma denoiser through vp_denoiser, and
the distance is l2 (the paper's CD-l2 ablation, Fig. 3) as the repo has no LPIPS network. The sigma grid is clipped
to the teacher's range [0.01, 80] rather than [0.002, 80].
"""

import os

from research.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = load_config_file(os.path.join(HERE, "ddpm_cifar10.py"))
    c.model.dropout = 0.0
    c.task = "fewstep"
    c.fewstep.method = "cd"
    c.fewstep.teacher_workdir = "runs/ddpm_cifar10"
    c.fewstep.solver = "heun"
    c.fewstep.distance = "l2"
    c.fewstep.weighting = "uniform"
    c.fewstep.index_distribution = "uniform"
    c.fewstep.num_points = 18
    c.fewstep.target_ema = 0.0
    c.optim.lr = 4e-4
    c.optim.warmup_steps = 0
    c.optim.lr_schedule = "constant"
    c.train.batch_size = 512
    c.train.num_steps = 800_000
    c.train.ema_decay = 0.9999
    c.train.ckpt_every = 10_000
    c.train.sample_every = 50_000
    return c
