"""The teacher of a distillation run (fewstep.teacher_workdir): read, after checking it matches the student's config.
Shared by the few-step methods (research/tasks/fewstep.py) and ADD (research/tasks/add.py)."""

from __future__ import annotations

from research.config import ConfigError
from research.run import load_params, read_config

# model keys that change how the network is computed, not what it computes: a student may set them differently
EXECUTION_ONLY = ("remat",)


def load_teacher(config):
    """(teacher params, teacher step) from fewstep.teacher_workdir, after checking it matches this config."""
    f = config.fewstep
    try:
        tconfig = read_config(f.teacher_workdir)
    except ConfigError:
        raise ConfigError(
            f"fewstep.teacher_workdir={f.teacher_workdir!r} is not a training workdir (no config.json); "
            f"train a teacher with python -m research.train, or point the key at one"
        ) from None
    check_teacher_config(config, tconfig)
    _, params, step = load_params(
        f.teacher_workdir, None if f.teacher_step < 0 else f.teacher_step, use_ema=f.teacher_use_ema
    )
    return params, step


def check_teacher_config(config, tconfig) -> None:
    """The student reuses the teacher's network and schedule: refuse a teacher they do not match."""
    diffs = []
    teacher_model = tconfig.model.to_dict()
    for key, value in config.model.to_dict().items():
        if key not in EXECUTION_ONLY and teacher_model.get(key) != value:
            diffs.append(f"model.{key}: teacher {teacher_model.get(key)!r} vs config {value!r}")
    for key in ("schedule", "timesteps", "beta_start", "beta_end", "prediction", "var_type"):
        if tconfig.diffusion[key] != config.diffusion[key]:
            diffs.append(f"diffusion.{key}: teacher {tconfig.diffusion[key]!r} vs config {config.diffusion[key]!r}")
    for key in ("image_size", "channels", "centered"):
        if tconfig.data[key] != config.data[key]:
            diffs.append(f"data.{key}: teacher {tconfig.data[key]!r} vs config {config.data[key]!r}")
    if diffs:
        raise ConfigError(
            f"the teacher in {config.fewstep.teacher_workdir} does not match this config "
            f"({'; '.join(diffs[:5])}); copy those values from its config.json"
        )
