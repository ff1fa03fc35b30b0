"""The training loop: one for every task. Build the task's trainer, resume from the workdir, loop, log, checkpoint.

The loop knows the Task interface (research/tasks) and nothing of any particular task.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from research.config import ConfigError
from research.run import write_run_files
from research.shapes import data_shape
from research.tasks import Trainer, task_of, validate_config
from research.train import mesh as mesh_lib
from research.train.checkpoint import Checkpointer, CheckpointMismatchError

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def make_mesh(train_config):
    """The run's mesh: all devices (or the first train.num_devices), train.mesh_model wide on 'model'."""
    n = int(train_config.num_devices)
    if n and jax.process_count() > 1:
        raise ConfigError("train.num_devices selects devices of one process; leave it at 0 on several hosts")
    if n > jax.device_count():
        raise ConfigError(f"train.num_devices={n} but only {jax.device_count()} devices are visible")
    try:
        return mesh_lib.make_mesh(train_config.mesh_model, devices=jax.devices()[:n] if n else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_trainer(config, mesh=None) -> Trainer:
    """The config's task's Trainer on `mesh` (default: the config's, see make_mesh)."""
    mesh = mesh if mesh is not None else make_mesh(config.train)
    return task_of(config).build_trainer(config, mesh)


def check_frozen_parts(saved_meta: dict, meta: dict, step: int, directory: str) -> None:
    """A resumed run must see the same frozen parts (teacher, autoencoder) it started with."""
    for part, ref in (meta.get("frozen") or {}).items():
        old = (saved_meta.get("frozen") or {}).get(part)
        if old is not None and old.get("sha256") != ref.get("sha256"):
            raise CheckpointMismatchError(
                f"the frozen part {part!r} ({ref.get('workdir')}, step {ref.get('step')}) is not the one the "
                f"checkpoint at step {step} in {directory} was trained with (sha256 {str(old.get('sha256'))[:12]} "
                f"vs {str(ref.get('sha256'))[:12]}); point the config at the original run and step, or use a new "
                f"--workdir"
            )


def initialize_from(state, trainer, workdir: str, step: Optional[int] = None):
    """state with the parameters and EMA parameters of every trainable part replaced by those of `workdir`'s
    checkpoint (train.init_from); ConfigError naming the part or parameter that is missing or has another shape."""
    from research.run import restore_tree

    tree, _, found = restore_tree(workdir, step)
    params, emas = dict(state.params), dict(state.ema_params or {})
    for part in params:
        source = (tree.get("params") or {}).get(part)
        if source is None:
            raise ConfigError(
                f"train.init_from={workdir} (step {found}) has no part {part!r} (it has "
                f"{sorted(tree.get('params') or {})}); it must be a run of the same task and networks"
            )
        want = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(params[part])[0]}
        got = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(source)[0]}
        if want != got:
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise ConfigError(
                f"train.init_from={workdir}: part {part!r} does not fit this config's network ({len(diff)} parameters "
                f"differ, e.g. {diff[0]}: {got.get(diff[0])} there vs {want.get(diff[0])} here)"
            )
        sharding = trainer.state_sharding.params[part]
        params[part] = jax.device_put(source, sharding)
        if part in emas:
            ema = (tree.get("ema_params") or {}).get(part) or source
            emas[part] = jax.device_put(ema, trainer.state_sharding.ema_params[part])
    return state.replace(params=params, ema_params=emas if state.ema_params is not None else None)


def _event_writer(workdir: str):
    """TensorBoard event files beside metrics.jsonl (`tensorboard --logdir runs/` shows every run side by side)."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)


def check_fid_request(config, task) -> None:
    """ConfigError, before anything is compiled, when train.fid_every cannot be honoured."""
    if not config.train.fid_every:
        return
    from research.metrics.classifier import ClassifierError, get_recipe

    if not task.has_sampler:
        raise ConfigError(f"train.fid_every: task {task.name!r} has no sampler to draw samples from; set it to 0")
    if jax.process_count() > 1:
        raise ConfigError("train.fid_every samples on one process; on several hosts evaluate the checkpoints after")
    try:
        get_recipe(config.data.name)
    except ClassifierError as e:
        raise ConfigError(f"train.fid_every: {e}") from None


def checkpoint_domain_scores(workdir: str, config, step: int, num: int, *, seed: int = 0, options=None) -> dict:
    """Domain FID of `num` samples of the checkpoint at `step` (the run's sample settings, or `options`) against the
    training split -> {'fid_domain', 'classifier_score'[, 'classifier_accuracy' for class-conditional samples]}."""
    import dataclasses

    from research.tasks import SampleOptions

    options = dataclasses.replace(options or SampleOptions(), step=step)
    result = task_of(config).sampler(workdir, config, options)(int(num), seed=seed, progress=False)
    return domain_scores(result.images, result.labels, config)


def domain_scores(images: np.ndarray, labels, config) -> dict:
    """Domain FID of uint8 samples against the training split of config.data -> {'fid_domain', 'classifier_score'
    [, 'classifier_accuracy' when `labels` holds the requested classes (none negative)]}."""
    from research.metrics.evaluation import DatasetSpec, evaluate_images, feature_space

    labels = labels if labels is not None and labels.min() >= 0 else None
    data_dir = config.data.data_dir or None
    m = evaluate_images(
        images,
        feature_space("domain", config.data.name, data_dir=data_dir),
        DatasetSpec(config.data.name, "train"),
        labels=labels,
        data_dir=data_dir,
        kid=False,
        precision_recall=False,
        progress=False,
    )
    keys = ("fid", "classifier_score", "classifier_accuracy")
    return {("fid_domain" if k == "fid" else k): m[k] for k in keys if k in m}


def _read_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def train(config, workdir: str, *, stop_at: Optional[int] = None) -> dict:
    """Train until config.train.num_steps (or stop_at, for tests), resuming from workdir if it has a checkpoint.

    Nothing in the workdir changes until the command is known to be compatible with it: config.json and
    run_info.json are written after the newest checkpoint has been checked against the model this config builds.
    Returns {'step': final step, 'metrics': last logged metrics, 'state': the final TrainState}.
    """
    from research.data import make_train_iterator, peek_shape

    validate_config(config)
    task = task_of(config)
    check_fid_request(config, task)
    tc = config.train
    mesh = make_mesh(tc)
    n_dev = mesh.devices.size
    data_parallel = mesh.shape["data"]
    if tc.batch_size % data_parallel:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is not divisible by the {data_parallel} data-parallel "
            f"devices ({n_dev} devices, mesh_model={tc.mesh_model})"
        )
    shape = tuple(peek_shape(config.data))  # raises a clear error for missing data
    if shape != data_shape(config):
        raise ConfigError(
            f"the data has images of shape {shape} but the config says {data_shape(config)}; "
            f"set data.image_size / data.channels to match"
        )

    workdir = os.path.abspath(workdir)
    config = task.resolve(config)
    if tc.init_from:
        config = config.copy_and_resolve_references()
        config.train.init_from = os.path.abspath(tc.init_from)
        tc = config.train
    trainer = build_trainer(config, mesh)
    batch_sh, meta = trainer.batch_sharding, trainer.meta

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints)
    restored = None
    try:

        def check(step, saved_meta):
            ckpt.check_compatible(step, meta, saved=saved_meta)
            check_frozen_parts(saved_meta, meta, step, ckpt.directory)

        restored = ckpt.restore_newest_intact(trainer.abstract_state_sharded(), check=check)
    except Exception:
        ckpt.close()
        raise
    latest = restored[0] if restored is not None else None
    write_run_files(config, workdir, resumed_from=latest)

    source = task.data_source(config, trainer)
    prepare = task.batch_preparer(config, trainer)
    data_iter = make_train_iterator(
        config.data,
        global_batch_size=tc.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        source=source,
    )
    if restored is not None:
        _, state, data_state, _, skipped = restored
        if data_state:
            data_iter.set_state(data_state)
        # Damaged newer checkpoints (`skipped`) were logged as warnings naming them and the step used instead.
        log.info("resumed from step %d in %s", latest, workdir)
    else:
        state = trainer.init(jax.random.PRNGKey(config.seed))
        if tc.init_from:
            state = initialize_from(state, trainer, tc.init_from, int(tc.init_from_step) or None)
            log.info("initialised from %s", tc.init_from)

    train_step = trainer.step
    start = int(jax.device_get(state.step))
    end = tc.num_steps if stop_at is None else min(stop_at, tc.num_steps)
    last_saved = latest
    preview = None
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    pending = []  # (step, device metrics) not yet checked for NaN
    last_metrics = {}
    t_last, step_last = time.time(), start
    is_main = jax.process_index() == 0
    board = _event_writer(workdir) if tc.tensorboard and is_main else None

    def flush(step_now):
        """Fetch pending metrics, stop on a non-finite loss, append to the log."""
        nonlocal last_metrics, t_last, step_last
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        rows = []
        for (s, _), m in zip(pending, fetched):
            row = {"step": s, **{k: float(v) for k, v in m.items()}}
            if not math.isfinite(row["loss"]):
                pending.clear()
                raise TrainingDiverged(
                    f"loss became {row['loss']} at step {s}; stopped without saving. The last good checkpoint "
                    f"(step {last_saved}) is kept in {ckpt.directory}. Lower optim.lr, raise optim.warmup_steps "
                    f"or set optim.grad_clip."
                )
            rows.append(row)
        pending.clear()
        now = time.time()
        rate = (step_now - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step_now
        rows[-1]["steps_per_sec"] = rate
        last_metrics = rows[-1]
        if is_main:
            with open(metrics_path, "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        if board is not None:
            for row in rows:
                for k, v in row.items():
                    if k != "step":
                        board.add_scalar(f"train/{k}", v, row["step"])
        return rate

    bar = tqdm(total=end, initial=start, desc="train", disable=not (tc.progress and is_main), dynamic_ncols=True)
    try:
        for step in range(start, end):
            local = next(data_iter)
            # Text fields (captions) stay on the host as numpy string arrays, this process's rows only: the task's
            # preparer turns them into arrays (e.g. token ids); without one they are not used.
            host = {k: v for k, v in local.items() if np.asarray(v).dtype.kind in "USO"}
            batch = mesh_lib.global_batch({k: v for k, v in local.items() if k not in host}, batch_sh)
            if prepare is not None:
                batch = prepare({**batch, **host}, step)
            state, metrics = train_step(state, batch)
            done = step + 1
            pending.append((done, metrics))
            bar.update(1)
            if done % tc.log_every == 0 or done == end:
                rate = flush(done)
                bar.set_postfix(loss=f"{last_metrics['loss']:.4f}", steps_per_s=f"{rate:.2f}")
            if done % tc.ckpt_every == 0 or done == end:
                flush(done)
                ckpt.save(done, state, data_iter.get_state(), meta)
                last_saved = done
                if tc.fid_every and done % tc.fid_every == 0:
                    ckpt.wait()
                    t0 = time.time()
                    row = {"step": done, **checkpoint_domain_scores(workdir, config, done, int(tc.fid_num))}
                    row.update(num=int(tc.fid_num), seconds=round(time.time() - t0, 1))
                    with open(os.path.join(workdir, "fid.jsonl"), "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if board is not None:
                        board.add_scalar("eval/fid_domain", row["fid_domain"], done)
                    log.info("step %d: domain FID %.3f (%d samples)", done, row["fid_domain"], row["num"])
            if tc.sample_every and (done % tc.sample_every == 0 or done == end) and is_main:
                if preview is None:
                    preview = task.preview(config, trainer) or (lambda state, path: None)
                grid = os.path.join(workdir, "samples", f"step_{done:07d}.png")
                preview(state, grid)
                if board is not None and os.path.exists(grid):
                    board.add_image("samples", _read_png(grid), done, dataformats="HWC")
    finally:
        bar.close()
        if board is not None:
            board.close()
        ckpt.wait()
        ckpt.close()
    final_step = int(jax.device_get(state.step))
    if final_step == tc.num_steps:
        task.on_finish(config, trainer, state, workdir)
    return {"step": final_step, "metrics": last_metrics, "state": state}
