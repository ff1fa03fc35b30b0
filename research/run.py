"""The workdir contract: what a training run leaves on disk, and the one place that reads it back.

A workdir holds
    config.json       the resolved config (rebuilt on top of base_config(), so keys added later take defaults)
    run_info.json     {"history": [one entry per start of `research.train` on this workdir]}: seed, git
                      commit, package versions, devices, argv
    metrics.jsonl     one JSON object per logged step
    samples/          preview grids written while training
    checkpoints/<N>/  orbax items 'state' (TrainState), 'data' (the iterator's position), 'meta' (the parameter
                      signature, the model section, frozen-part references)

Nothing here knows about tasks: restoring for training takes the abstract state the task built; restoring for
inference (`load_params`) reads the saved tree as it is and takes one named part out of it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Optional, Sequence

from research.config import ConfigError, config_from_dict

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
CHECKPOINT_DIR = "checkpoints"


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def is_run(workdir: str) -> bool:
    return os.path.isfile(config_path(workdir))


def read_config(workdir: str, *, what: str = "a training workdir"):
    """The run's config (ConfigDict); ConfigError if `workdir` holds none."""
    path = config_path(workdir)
    if not os.path.isfile(path):
        raise ConfigError(f"{workdir} has no {CONFIG_FILE}: is it {what} (python -m research.train ... --workdir)?")
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path} is not readable JSON ({e}); restore it from the run's checkpoints' config or retrain"
        ) from None
    return config_from_dict(values)


def checkpointer(workdir: str, max_to_keep: Optional[int] = None):
    from research.train.checkpoint import Checkpointer

    return Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep)


def checkpoint_steps(workdir: str) -> list:
    """Sorted steps of the checkpoints in workdir (empty when there are none)."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return []
    ckpt = checkpointer(workdir)
    try:
        return sorted(ckpt.all_steps())
    finally:
        ckpt.close()


def resolve_step(workdir: str, step: Optional[int] = None) -> int:
    """`step`, checked to exist, or the newest checkpoint's step."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ConfigError(f"no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}: train the run first")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ConfigError(f"no checkpoint at step {step} in {workdir}; available: {steps}")
    return int(step)


def read_meta(workdir: str, step: int) -> dict:
    ckpt = checkpointer(workdir)
    try:
        return ckpt.read_meta(step)
    finally:
        ckpt.close()


def restore_tree(workdir: str, step: Optional[int] = None) -> tuple:
    """(saved state as nested dicts of arrays on this process's first device, meta, step): the checkpoint read as
    it was written, without building the task's optimizer or sharding (for inference and frozen parts).

    With step=None the newest readable checkpoint is used (a damaged newer one is named in a warning); an explicit
    step that is damaged is an error naming it."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from research.train.checkpoint import CheckpointDamagedError

    steps = checkpoint_steps(workdir)
    if not steps or (step is not None and step not in steps):
        resolve_step(workdir, step)  # the "no checkpoint" / "no checkpoint at step N" error
    device = SingleDeviceSharding(jax.local_devices()[0])
    ckpt = checkpointer(workdir)
    try:
        found = ckpt.restore_newest_intact(
            lambda s: ckpt.saved_abstract(s, device), steps=None if step is None else [step]
        )
    except CheckpointDamagedError as e:
        readable = [s for s in steps if s not in {d for d, _ in e.damaged}]
        hint = f" Other checkpoints: {readable} (pass --step)." if readable and step is not None else ""
        raise ConfigError(f"{e}{hint}") from None
    finally:
        ckpt.close()
    step, tree, _, meta, _ = found
    return tree, meta, step


def load_params(workdir: str, step: Optional[int] = None, *, part: str = "net", use_ema: bool = True) -> tuple:
    """(config, params of `part`, step) of a run: the EMA copy when use_ema and the part has one."""
    config, params, step = load_parts(workdir, step, parts=(part,), use_ema=use_ema)
    return config, params[part], step


def load_parts(workdir: str, step: Optional[int] = None, *, parts: Sequence[str], use_ema: bool = True) -> tuple:
    """(config, {part: params}, step) of a run, the checkpoint read once for all the parts: for each, the EMA copy
    when use_ema and the part has one."""
    config = read_config(workdir)
    tree, _, step = restore_tree(workdir, step)
    out = {}
    for part in parts:
        source = tree.get("ema_params") if use_ema else None
        if not source or part not in source:
            source = tree.get("params") or {}
        if part not in source:
            raise ConfigError(
                f"the checkpoint at step {step} in {workdir} has no part {part!r} "
                f"(it has {sorted(tree.get('params') or {})})"
            )
        out[part] = source[part]
    return config, out, step


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(config) -> dict:
    import importlib.metadata as md

    import jax

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "seed": config.seed,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "versions": versions,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "argv": sys.argv,
    }


def write_run_files(config, workdir: str, *, resumed_from: Optional[int] = None) -> None:
    """config.json (written when the run starts; a resumed run has already been checked against it) and one more
    entry in run_info.json's history. Process 0 only."""
    import jax

    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    if resumed_from is None or not is_run(workdir):
        tmp = config_path(workdir) + ".tmp"
        with open(tmp, "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(tmp, config_path(workdir))
    path = os.path.join(workdir, RUN_INFO_FILE)
    history = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
            history = old["history"] if isinstance(old, dict) and "history" in old else [old]
        except (OSError, ValueError):
            history = []
    entry = run_info(config)
    entry["resumed_from_step"] = resumed_from
    history.append(entry)
    with open(path + ".tmp", "w") as f:
        json.dump({"history": history}, f, indent=2)
    os.replace(path + ".tmp", path)
