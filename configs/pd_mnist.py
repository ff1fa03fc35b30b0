"""Progressive distillation (Salimans & Ho 2022) of a local teacher: task='fewstep', fewstep.method='pd'.

    --config configs/pd_mnist.py           MNIST: the configs/ddpm_mnist.py:small teacher in runs/ddpm_mnist_small
                                           (eps, linear betas, T=1000), 512 -> 1 DDIM steps in 9 rounds of 1000
                                           updates at batch 64 (a CPU budget, not the paper's 50k per round)
    --config configs/pd_mnist.py:digits    8x8 digits: the v-parameterised quickstart teacher in runs/quickstart_v
                                           (python -m research.train --config configs/quickstart.py
                                           --config.diffusion.prediction=v --workdir runs/quickstart_v), 16 -> 1 steps
                                           in 4 rounds of 250 updates: minutes on two CPU cores
    --config configs/pd_mnist.py:digits-s32-f4-r500
                                           suffixes change one setting each: -s<N> the teacher's steps the first
                                           round starts from, -f<N> the final student's steps, -r<N> updates per
                                           round (the converged digits run of REPRODUCTION.md: 32 -> 4 steps)

The student keeps the teacher's parameterisation (it starts as a copy of the teacher's network). The paper uses v;
the MNIST teacher predicts eps, whose x0 = (x_t - sigma eps) / alpha divides by alpha_T ~ 6e-3 at the top step, so
the last rounds there clip the teacher's x0 (fewstep.pd_clip_x0) and are limited by it: train a v teacher
(--config.diffusion.prediction=v) for a faithful run. Override the teacher with --config.fewstep.teacher_workdir.
Each round restarts Adam and a cosine learning-rate decay (the paper decays linearly to 0 within each round); the
checkpoint at step (r + 1) * pd_steps_per_round holds the round's student (see research/tasks/fewstep.py).
"""

import os

from research.config import load_config_file, parse_variant

HERE = os.path.dirname(os.path.abspath(__file__))


SUFFIXES = {"s": "pd_start_steps", "f": "pd_final_steps", "r": "pd_steps_per_round"}


def _count(text: str):
    return int(text) if text.isdigit() and int(text) >= 1 else None


def _parse(variant: str):
    """'<data>[-s<start>][-f<final>][-r<updates per round>]' -> (data, {fewstep key: value})."""
    data, values = parse_variant(
        variant,
        ("mnist", "digits"),
        dict.fromkeys(SUFFIXES, _count),
        "mnist or digits, optionally followed by -s<start steps>, -f<final steps>, -r<updates per round>, "
        "e.g. digits-s32-f4-r500",
    )
    return data, {SUFFIXES[k]: v for k, v in values.items()}


def get_config(variant: str = "mnist"):
    variant, values = _parse(variant)
    if variant == "mnist":
        c = load_config_file(os.path.join(HERE, "ddpm_mnist.py") + ":small")
        c.fewstep.teacher_workdir = "runs/ddpm_mnist_small"
        c.fewstep.pd_start_steps = 512
        c.fewstep.pd_steps_per_round = 1000
        c.fewstep.pd_clip_x0 = True
        c.optim.lr = 1e-4
    else:
        c = load_config_file(os.path.join(HERE, "quickstart.py"))
        c.diffusion.prediction = "v"
        c.fewstep.teacher_workdir = "runs/quickstart_v"
        c.fewstep.pd_start_steps = 16
        c.fewstep.pd_steps_per_round = 250
        c.optim.lr = 2e-4
    c.task = "fewstep"
    c.fewstep.method = "pd"
    c.fewstep.pd_final_steps = 1
    for key, value in values.items():
        c.fewstep[key] = value
    c.fewstep.pd_weighting = "truncated_snr"
    rounds = (c.fewstep.pd_start_steps // c.fewstep.pd_final_steps).bit_length() - 1
    c.train.num_steps = rounds * c.fewstep.pd_steps_per_round
    c.train.ckpt_every = c.fewstep.pd_steps_per_round
    c.train.keep_checkpoints = rounds
    c.train.sample_every = c.fewstep.pd_steps_per_round
    c.train.ema_decay = 0.999
    c.train.ema_warmup = True
    c.optim.warmup_steps = 0
    c.optim.lr_schedule = "cosine"
    c.model.dropout = 0.0
    return c
