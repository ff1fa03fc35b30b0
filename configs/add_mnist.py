"""Adversarial diffusion distillation (Sauer et al. 2023) of a class-conditional MNIST U-Net: task='fewstep',
fewstep.method='add'.

    --config configs/add_mnist.py:teacher    the teacher: the ControlNet demo's class-conditional base U-Net
                                             (configs/controlnet_mnist.py:base, 268k parameters, null label) in
                                             the v parameterisation, which ADD needs at t = 999 (an eps model's x0
                                             divides by sqrt(alpha_bar_999) ~ 0 there); about 35 min on 2 cores
    --config configs/add_mnist.py            the student: ADD from runs/add_mnist_teacher, the discriminator on the
                                             MNIST domain classifier's features with class-projection heads, the
                                             teacher's target guided at s = 2 (as ADD distils a guided teacher)

    python -m research.train --config configs/add_mnist.py:teacher --workdir runs/add_mnist_teacher
    python -m research.train --config configs/add_mnist.py --workdir runs/add_mnist
    python -m research.sample --workdir runs/add_mnist --steps 1      # or 2, 4
"""

import os

from research.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))
TEACHER = "runs/add_mnist_teacher"


def get_config(variant: str = "student"):
    if variant not in ("student", "teacher"):
        raise ValueError(f"unknown variant {variant!r}: use 'student' or 'teacher'")
    c = load_config_file(os.path.join(HERE, "controlnet_mnist.py") + ":base")
    c.diffusion.prediction = "v"
    if variant == "teacher":
        return c
    c.task = "fewstep"
    c.fewstep.method = "add"
    c.fewstep.teacher_workdir = TEACHER
    c.fewstep.sample_steps = 1
    c.add.features = "classifier"
    c.add.teacher_guidance = 2.0
    c.add.disc_lr = 1e-3  # as configs/add_digits.py found
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.lr_schedule = "constant"
    c.train.num_steps = 2000
    c.train.ema_decay = 0.99
    c.train.ckpt_every = 500
    c.train.keep_checkpoints = 4
    c.train.sample_every = 500
    return c
