"""Consistency distillation (Song et al. 2023, Alg. 2) of a local teacher: task='fewstep', fewstep.method='cd'.

    --config configs/cd_mnist.py           MNIST: the configs/ddpm_mnist.py:small teacher in runs/ddpm_mnist_small
    --config configs/cd_mnist.py:digits    8x8 digits: the v quickstart teacher in runs/quickstart_v (see
                                           configs/pd_mnist.py for how to train it); minutes on two CPU cores

CM's CIFAR-10 CD recipe scaled down: N = 18 points on the Karras grid (clipped to the teacher schedule's sigma
range), Heun steps of the teacher's probability-flow ODE, an EMA target with fixed mu = 0.95 (CM's value for its
64x64 and LSUN runs) and a separate EMA of the student for sampling. The distance is l2 (CM's best used LPIPS, for
which this repo has no network on 8x8 / 28x28 images); --config.fewstep.distance=pseudo_huber for iCT's.
"""

import os

from research.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = "mnist"):
    if variant not in ("mnist", "digits"):
        raise ValueError(f"unknown variant {variant!r}: use 'mnist' or 'digits'")
    if variant == "mnist":
        c = load_config_file(os.path.join(HERE, "ddpm_mnist.py") + ":small")
        c.fewstep.teacher_workdir = "runs/ddpm_mnist_small"
        c.train.num_steps = 5000
    else:
        c = load_config_file(os.path.join(HERE, "quickstart.py"))
        c.diffusion.prediction = "v"
        c.fewstep.teacher_workdir = "runs/quickstart_v"
        c.train.num_steps = 1000
    c.task = "fewstep"
    c.fewstep.method = "cd"
    c.fewstep.solver = "heun"
    c.fewstep.distance = "l2"
    c.fewstep.weighting = "uniform"
    c.fewstep.index_distribution = "uniform"
    c.fewstep.num_points = 18
    c.fewstep.target_ema = 0.95
    c.fewstep.sample_steps = 1
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.lr_schedule = "constant"
    c.model.dropout = 0.0
    c.train.ema_decay = 0.999
    c.train.ema_warmup = True
    c.train.ckpt_every = c.train.num_steps // 2
    c.train.sample_every = c.train.num_steps // 2
    return c
