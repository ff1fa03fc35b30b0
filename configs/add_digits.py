"""Adversarial diffusion distillation (Sauer et al. 2023) of the 8x8-digits teacher: task='fewstep',
fewstep.method='add'. Minutes on two CPU cores.

    --config configs/add_digits.py            the discriminator reads the digits domain classifier's features
    --config configs/add_digits.py:teacher    ... the teacher U-Net's own encoder features (latent ADD's choice)
    --config configs/add_digits.py:classifier-l0      suffixes change one setting: -l<lambda> the distillation
    --config configs/add_digits.py:classifier-noadv   weight (default 2.5), -noadv no adversarial term
                                                       (experiments/add_ablation.py sweeps these)

The teacher is the v-parameterised quickstart model in runs/quickstart_v (train it first:
python -m research.train --config configs/quickstart.py --config.diffusion.prediction=v --workdir runs/quickstart_v).
ADD's recipe at this scale: the student (a copy of the teacher) trains at the 4 timesteps 999/749/499/249 with
lambda = 2.5 for the distillation term (weight alpha_t), a hinge-loss discriminator of 1x1 heads on three feature
layers with an R1 penalty, Adam 1e-4 for the student and 1e-3 for the discriminator (b1 = 0), batch 64, 1000
updates. The discriminator's rate is the one setting probed here: at 1e-4 its accuracy stayed at chance (0.51 over
1000 updates) and the 1-step FID was 138; at 1e-3, after 300 updates, 187 against 1032 at 1e-4 (two more
discriminator steps per update or twice the head width changed it by under 5%).

    python -m research.train --config configs/add_digits.py --workdir runs/add_digits
    python -m research.sample --workdir runs/add_digits --steps 1      # or 2, 4
"""

import os

from research.config import load_config_file, parse_variant

HERE = os.path.dirname(os.path.abspath(__file__))
FEATURES = ("classifier", "teacher")


def _weight(text: str):
    """A finite weight >= 0 from its text, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 <= value < float("inf") else None


def _parse(variant: str):
    """'<features>[-l<lambda>][-noadv]' -> (features, distillation weight, adversarial weight)."""
    features, values = parse_variant(
        variant,
        FEATURES,
        {"noadv": lambda rest: True if rest == "" else None, "l": _weight},
        f"<features>[-l<lambda>][-noadv] with features in {list(FEATURES)}, "
        "e.g. classifier, teacher, classifier-l0, classifier-noadv",
    )
    return features, values.get("l", 2.5), 0.0 if values.get("noadv") else 1.0


def get_config(variant: str = "classifier"):
    features, distill_weight, adversarial_weight = _parse(variant)
    c = load_config_file(os.path.join(HERE, "quickstart.py"))
    c.diffusion.prediction = "v"
    c.task = "fewstep"
    c.fewstep.method = "add"
    c.fewstep.teacher_workdir = "runs/quickstart_v"
    c.fewstep.sample_steps = 1
    c.add.features = features
    c.add.student_timesteps = 4
    c.add.distill_weight = distill_weight
    c.add.adversarial_weight = adversarial_weight
    c.add.disc_lr = 1e-3
    c.add.r1_gamma = 0.1
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.lr_schedule = "constant"
    c.model.dropout = 0.0
    c.train.num_steps = 1000
    c.train.ema_decay = 0.99
    c.train.ema_warmup = True
    c.train.ckpt_every = 250
    c.train.keep_checkpoints = 4
    c.train.sample_every = 250
    return c
