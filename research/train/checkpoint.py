"""Orbax checkpoints of the whole run: train state (params, EMA, optimizer, step, RNG), the data iterator's
position, and a model signature used to refuse a checkpoint from a different model before restoring."""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint in a workdir was written by a model with other parameter shapes."""


def param_signature(abstract_params) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: Optional[int] = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "data", "meta"),
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            meta=ocp.args.JsonSave(meta)))

    def wait(self):
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def check_compatible(self, step: int, meta: dict) -> None:
        """Raise CheckpointMismatchError naming the first differing parameters and model settings."""
        saved = self.read_meta(step)
        old, new = saved.get("params", {}), meta["params"]
        if old == new:
            return
        diffs = [f"{k}: checkpoint {old.get(k)} vs model {new.get(k)}"
                 for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        model_diffs = [f"model.{k}: checkpoint {saved.get('model', {}).get(k)!r} vs config {v!r}"
                       for k, v in meta.get("model", {}).items() if saved.get("model", {}).get(k) != v]
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} in {self.directory} was written by a different model "
            f"({len(diffs)} parameter shapes differ, e.g. {'; '.join(diffs[:3])}). "
            + (f"Config differences: {'; '.join(model_diffs[:5])}. " if model_diffs else "")
            + "Use a new --workdir, or the config that wrote this checkpoint (saved as config.json beside it).")

    def restore(self, step: int, abstract_state):
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except ValueError as e:
            if "do not match" not in str(e):
                raise
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} has a different train-state structure than this "
                f"config builds (the parameters match, so an optimizer setting such as optim.optimizer probably "
                f"changed). Use the run's config.json, or a new --workdir. Details: {e}") from None
        return restored.state, restored.data, restored.meta

    def close(self):
        self.manager.close()
