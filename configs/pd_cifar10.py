"""Progressive distillation on CIFAR-10 with the settings of Salimans & Ho (2022), in this repo's discrete time.

Paper result (CIFAR-10, unconditional, FID of the distilled student; their Table 2 / Fig. 4): 8 steps 2.57,
4 steps 3.00, 2 steps 4.51, 1 step 9.12.

Teacher: the paper's setting is a v-parameterised model with the cosine schedule; train one with
    python -m research.train --config configs/ddpm_cifar10.py --config.diffusion.prediction=v \
        --config.diffusion.schedule=cosine --workdir runs/ddpm_cifar10_v
Distillation: truncated-SNR weighting (max(SNR, 1) on the x-space error), batch 128, Adam lr 1e-4 restarted and
annealed to 0 within each round (cosine here, linear in the paper), 50k updates per halving, no dropout.
Deviation: the paper distils in continuous time from 8192 teacher steps; with T = 1000 discrete timesteps the
nested trailing grids allow at most 512, so this runs 9 rounds 512 -> 1 (450k updates in all).
"""

import os

from research.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = load_config_file(os.path.join(HERE, "ddpm_cifar10.py"))
    c.diffusion.prediction = "v"
    c.diffusion.schedule = "cosine"
    c.model.dropout = 0.0
    c.task = "fewstep"
    c.fewstep.method = "pd"
    c.fewstep.teacher_workdir = "runs/ddpm_cifar10_v"
    c.fewstep.pd_start_steps = 512
    c.fewstep.pd_final_steps = 1
    c.fewstep.pd_steps_per_round = 50_000
    c.fewstep.pd_weighting = "truncated_snr"
    rounds = 9
    c.train.num_steps = rounds * c.fewstep.pd_steps_per_round
    c.train.batch_size = 128
    c.train.ckpt_every = 10_000
    c.train.keep_checkpoints = c.train.num_steps // c.train.ckpt_every
    c.train.sample_every = c.fewstep.pd_steps_per_round
    c.train.ema_decay = 0.9999
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.lr_schedule = "cosine"
    return c
