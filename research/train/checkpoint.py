"""Orbax checkpoints of the whole run: train state (params, EMA, optimizer, step, RNG), the data iterator's
position, and a model signature used to refuse a checkpoint from a different model before restoring.

A checkpoint whose files cannot be read (a truncated copy, a disk error, an overwritten file) raises
CheckpointDamagedError naming its step; `restore_newest_intact` falls back to the newest readable one. Damaged
checkpoints are never deleted: the next save moves them aside to `<step>.damaged-<timestamp>` for inspection."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("research")

# Tensorstore reports unreadable array stores as ValueErrors whose message starts with a status code.
_STORE_ERROR = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT): ")
# Orbax's words for "the saved tree differs from the requested one": a config change, not damage.
_MISMATCH = ("do not match", "Structure mismatch", "is not compatible with the stored shape")


class CheckpointMismatchError(ValueError):
    """The checkpoint in a workdir was written by a model with other parameter shapes."""


class CheckpointDamagedError(ValueError):
    """One or more checkpoints cannot be read; `damaged` lists them as (step, reason)."""

    def __init__(self, message: str, damaged: Sequence[tuple[int, str]] = ()):
        super().__init__(message)
        self.damaged = list(damaged)


def param_signature(abstract_params) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


def _read_json(path: str):
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: Optional[int] = 3):
        self.directory = os.path.abspath(directory)
        # Explicit handlers (not just item names) so that item_metadata can read a step before any restore.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._damaged: dict[int, str] = {}  # step -> reason, found by this instance's reads

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: Any, meta: dict) -> None:
        self._move_aside_damaged()
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        if not saved:
            # Orbax declines, without an error, any step at or below its newest one.
            later = sorted(s for s in self.all_steps() if s >= step)
            raise ValueError(
                f"cannot save step {step} in {self.directory}: it already holds checkpoint(s) {later} "
                f"at or after that step. Resume from the newest one, or use a new --workdir."
            )

    def _move_aside_damaged(self) -> None:
        """Rename every damaged step this instance found to `<step>.damaged-<timestamp>`, so that orbax neither
        declines saves at or below it nor deletes it when max_to_keep collects old steps."""
        steps = sorted(s for s in self._damaged if s in self.all_steps())
        if not steps:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if jax.process_index() == 0:
            for step in steps:
                src = self._step_dir(step)
                dst, n = os.path.join(self.directory, f"{step}.damaged-{stamp}"), 1
                while os.path.exists(dst):  # the same step damaged twice within a second
                    dst, n = os.path.join(self.directory, f"{step}.damaged-{stamp}-{n}"), n + 1
                os.rename(src, dst)
                log.warning(
                    "moved the damaged checkpoint at step %d aside to %s (%s); it is kept for inspection",
                    step,
                    dst,
                    self._damaged[step],
                )
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("research_checkpoint_move_damaged")
        self._damaged.clear()
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _damaged_error(self, step: int, reason: str) -> CheckpointDamagedError:
        self._damaged[step] = reason
        return CheckpointDamagedError(
            f"the checkpoint at step {step} in {self.directory} is damaged ({reason}); restore another step "
            f"(`restore_newest_intact` picks the newest readable one), or move {self._step_dir(step)} away.",
            [(step, reason)],
        )

    def _diagnose(self, step: int, items: Sequence[str]) -> Optional[str]:
        """The first unreadable file among the JSON files orbax reads for `items` of `step`, or None."""
        root = self._step_dir(step)
        for item in items:
            if not os.path.isdir(os.path.join(root, item)):
                return f"its {item}/ folder is missing"
        files = [f"{i}/metadata" for i in ("meta", "data") if i in items]
        if "state" in items:
            files += ["state/_METADATA", "state/_sharding", "state/manifest.ocdbt"]
            arrays = os.path.join(root, "state", "array_metadatas")
            if os.path.isdir(arrays):
                files += [f"state/array_metadatas/{n}" for n in sorted(os.listdir(arrays))]
        for rel in files:
            path = os.path.join(root, rel)
            if not os.path.isfile(path):
                if rel == "state/_sharding":
                    continue  # optional in orbax
                return f"{rel} is missing"
            if rel.endswith(".ocdbt"):
                continue  # binary, checksummed by tensorstore
            try:
                value = _read_json(path)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return f"{rel} is not valid JSON: {e}"
            except OSError as e:
                return f"{rel} cannot be read: {e.strerror or e}"
            if rel in ("meta/metadata", "data/metadata") and not isinstance(value, dict):
                return f"{rel} holds a {type(value).__name__}, not a JSON object"
            if rel == "state/_METADATA":
                tree = value.get("tree_metadata") if isinstance(value, dict) else None
                if not isinstance(tree, dict) or not all(
                    isinstance(v, dict)
                    and isinstance(v.get("key_metadata"), list)
                    and isinstance(v.get("value_metadata"), dict)
                    for v in tree.values()
                ):
                    return f"{rel} does not describe a tree of arrays"
        return None

    def _classify(self, step: int, items: Sequence[str], e: BaseException) -> Optional[str]:
        """A short reason when `e` means unreadable content, None when it is something else (a bug, a mismatch)."""
        found = self._diagnose(step, items)
        if found:
            return found
        if isinstance(e, PermissionError):
            return None  # readable by someone else: a setup problem, not damage
        msg = str(e).split("\n")[0].split(" [tensorstore_spec=")[0].replace(self._step_dir(step) + os.sep, "")
        if isinstance(e, (UnicodeDecodeError, json.JSONDecodeError, OSError, KeyError)):
            return f"{type(e).__name__}: {msg[:200]}"
        store = _STORE_ERROR.match(msg) if isinstance(e, ValueError) else None
        if store:
            files = re.findall(r'local file "([^"]+)"', msg)
            code = store.group(1)
            if files and not files[-1].endswith("/"):  # a file of the store: name it and its error
                detail = msg.rsplit('"', 1)[-1].lstrip(": ").split(": expected=")[0]
                if not detail:
                    return f"{files[-1]} is missing" if code == "NOT_FOUND" else f"{code} reading {files[-1]}"
                return f"{code} reading {files[-1]}: {detail[:120]}"
            return msg.replace('Error opening "zarr" driver: ', "")[:200]
        return None

    def read_meta(self, step: int) -> dict:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            reason = self._classify(step, ("meta",), e)
            if reason is None:
                raise
            raise self._damaged_error(step, reason) from e
        if not isinstance(meta, dict):
            raise self._damaged_error(step, f"meta/metadata holds a {type(meta).__name__}, not a JSON object")
        return meta

    def saved_abstract(self, step: int, sharding):
        """The train-state tree of `step` as it was saved, as ShapeDtypeStructs placed with `sharding` (one
        jax.sharding.Sharding for every leaf; 64-bit leaves jax cannot hold come back as numpy): the abstract state
        to restore a checkpoint without rebuilding the model and optimizer that wrote it."""
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as e:
            reason = self._classify(step, ("state",), e)
            if reason is None:
                raise
            raise self._damaged_error(step, reason) from e
        saved = getattr(saved, "tree", saved)
        if saved is None:
            raise self._damaged_error(step, self._diagnose(step, ("state",)) or "state/_METADATA is unreadable")

        def leaf(a):
            if jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype:  # 64-bit without jax_enable_x64: keep it exact
                return np.zeros(tuple(a.shape), a.dtype)
            return jax.ShapeDtypeStruct(tuple(a.shape), a.dtype, sharding=sharding)

        return jax.tree.map(leaf, saved)

    def check_compatible(self, step: int, meta: dict, saved: Optional[dict] = None) -> None:
        """Raise CheckpointMismatchError naming the first differing parameters and model settings. `saved` is the
        checkpoint's meta when already read (read_meta(step) otherwise)."""
        saved = self.read_meta(step) if saved is None else saved
        old, new = saved.get("params", {}), meta["params"]
        if old == new:
            return
        diffs = [
            f"{k}: checkpoint {old.get(k)} vs model {new.get(k)}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
        model_diffs = [
            f"model.{k}: checkpoint {saved.get('model', {}).get(k)!r} vs config {v!r}"
            for k, v in meta.get("model", {}).items()
            if saved.get("model", {}).get(k) != v
        ]
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} in {self.directory} was written by a different model "
            f"({len(diffs)} parameter shapes differ, e.g. {'; '.join(diffs[:3])}). "
            + (f"Config differences: {'; '.join(model_diffs[:5])}. " if model_diffs else "")
            + "Use a new --workdir, or the config that wrote this checkpoint (saved as config.json beside it)."
        )

    def restore(self, step: int, abstract_state):
        """-> (state, data_state, meta) of `step`; CheckpointMismatchError when the saved train-state tree differs
        from `abstract_state`, CheckpointDamagedError when its files cannot be read."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            # A damaged _METADATA can also read as a different tree: the file check runs first.
            reason = self._diagnose(step, ("state", "data", "meta"))
            if reason is None and isinstance(e, ValueError) and any(m in str(e) for m in _MISMATCH):
                raise CheckpointMismatchError(
                    f"the checkpoint at step {step} in {self.directory} has a different train-state structure than "
                    f"this config builds (the parameters match, so an optimizer setting such as optim.optimizer "
                    f"probably changed). Use the run's config.json, or a new --workdir. Details: {e}"
                ) from None
            reason = reason or self._classify(step, ("state", "data", "meta"), e)
            if reason is None:
                raise
            raise self._damaged_error(step, reason) from e
        for item in ("meta", "data"):
            value = getattr(restored, item)
            if not isinstance(value, dict):
                raise self._damaged_error(step, f"{item}/metadata holds a {type(value).__name__}, not a JSON object")
        return restored.state, restored.data, restored.meta

    def restore_newest_intact(
        self, abstract_state, check: Optional[Callable[[int, dict], None]] = None, steps: Optional[Sequence[int]] = None
    ):
        """Restore the newest readable checkpoint among `steps` (default: all) -> (step, state, data_state, meta,
        skipped), skipped = [(step, reason)] of the newer damaged ones, each logged as a warning; None when there
        is no checkpoint. `abstract_state` is a pytree, or a function step -> pytree (e.g. `lambda s:
        self.saved_abstract(s, sharding)`). `check(step, meta)` runs on each candidate's meta before its state is
        read; what it raises (a CheckpointMismatchError) propagates. CheckpointDamagedError when every candidate
        is damaged."""
        candidates = sorted(self.all_steps() if steps is None else steps, reverse=True)
        if not candidates:
            return None
        skipped = []
        for step in candidates:
            try:
                meta = self.read_meta(step)
                if check is not None:
                    check(step, meta)
                abstract = abstract_state(step) if callable(abstract_state) else abstract_state
                state, data_state, meta = self.restore(step, abstract)
            except CheckpointDamagedError as e:
                skipped.extend(e.damaged)
                continue
            for bad, reason in skipped:
                log.warning(
                    "the checkpoint at step %d in %s is damaged (%s); using step %d instead. It is left for "
                    "inspection (the next save moves it to %d.damaged-<timestamp>)",
                    bad,
                    self.directory,
                    reason,
                    step,
                    bad,
                )
            return step, state, data_state, meta, skipped
        listing = "; ".join(f"step {s}: {r}" for s, r in skipped)
        raise CheckpointDamagedError(
            f"no readable checkpoint in {self.directory}: the checkpoint{'s' if len(skipped) > 1 else ''} at "
            f"step{'s' if len(skipped) > 1 else ''} {', '.join(str(s) for s, _ in skipped)} "
            f"{'are' if len(skipped) > 1 else 'is'} damaged ({listing}). Move the damaged step folders away to "
            f"start over, or use a new --workdir.",
            skipped,
        )

    def close(self):
        self.manager.close()
