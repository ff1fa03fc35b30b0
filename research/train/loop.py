"""The training driver: build everything from a config, resume from the workdir, loop, log, checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from research.config import ConfigError, validate_config
from research.diffusion import likelihood
from research.latents import latent_enabled, model_input_shape
from research.models import build_model
from research.sampling import Generator, schedule_from_config, to_uint8
from research.images import save_grid
from research.train import mesh as mesh_lib
from research.train.checkpoint import Checkpointer, param_signature
from research.train.state import init_train_state, learning_rate_schedule, make_optimizer
from research.train.step import make_loss_fn, make_train_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def output_channels(config) -> int:
    return model_input_shape(config)[2] * (2 if config.diffusion.var_type == "learned_range" else 1)


def model_from_config(config):
    return build_model(config.model, out_channels=output_channels(config))


def example_inputs(config, batch: int = 1):
    x = jax.ShapeDtypeStruct((batch, *model_input_shape(config)), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32) if config.model.get("num_classes", 0) else None
    return x, t, y


def abstract_params(model, config):
    """Parameter shapes without allocating them (jax.eval_shape)."""
    x, t, y = example_inputs(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), jnp.zeros(t.shape, jnp.int32),
                                             None if y is None else jnp.zeros(y.shape, jnp.int32))["params"])


def init_params(model, config, key):
    x, t, y = example_inputs(config)
    return model.init(key, jnp.zeros(x.shape), jnp.zeros(t.shape, jnp.int32),
                      None if y is None else jnp.zeros(y.shape, jnp.int32))["params"]


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(config) -> dict:
    import importlib.metadata as md
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"seed": config.seed, "git_commit": _git_commit(), "python": platform.python_version(),
            "versions": versions, "backend": jax.default_backend(), "devices": jax.device_count(),
            "processes": jax.process_count(), "argv": sys.argv}


def write_run_files(config, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
        json.dump(run_info(config), f, indent=2)


@dataclasses.dataclass
class Trainer:
    """Everything a training step needs, built for one mesh."""
    model: Any
    schedule: Any
    mesh: Any
    abstract_state: Any
    state_sharding: Any
    batch_sharding: Any
    init: Callable          # key -> sharded TrainState
    step: Callable          # (state, batch) -> (state, metrics); donates the state
    meta: dict
    conditional: bool
    # (state, png_path) -> path; when set it replaces the diffusion sample grid (the autoencoder's reconstructions)
    write_preview: Optional[Callable] = None

    def abstract_state_sharded(self):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_sharding)


def build_trainer(config, mesh=None) -> Trainer:
    if config.task == "autoencoder":
        from research.train.autoencoder import build_autoencoder_trainer
        return build_autoencoder_trainer(config, mesh)
    if config.task == "fewstep":
        from research.train.fewstep import build_fewstep_trainer
        return build_fewstep_trainer(config, mesh)
    tc = config.train
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(tc.mesh_model)
    model = model_from_config(config)
    schedule = schedule_from_config(config.diffusion)
    tx = make_optimizer(config.optim, tc.num_steps)
    lr_schedule = learning_rate_schedule(config.optim, tc.num_steps)
    conditional = bool(config.model.get("num_classes", 0))
    loss_fn = make_loss_fn(model, schedule, config.diffusion, conditional=conditional)
    step_fn = make_train_step(loss_fn, tx, lr_schedule, tc.ema_decay, tc.ema_warmup)
    abstract_p = abstract_params(model, config)
    def make_t_sampler():
        if config.diffusion.t_sampling == "importance":
            return likelihood.importance_init(schedule.num_steps)
        return None

    abstract_state = jax.eval_shape(lambda p: init_train_state(p, tx, config.seed, make_t_sampler()), abstract_p)
    state_sh = mesh_lib.state_shardings(mesh, abstract_state)
    batch_sh = mesh_lib.batch_sharding(mesh)
    model_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.to_dict().items()}
    meta = {"params": param_signature(abstract_p), "model": model_cfg}
    init = jax.jit(lambda key: init_train_state(init_params(model, config, key), tx, config.seed, make_t_sampler()),
                   out_shardings=state_sh)
    step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
    return Trainer(model, schedule, mesh, abstract_state, state_sh, batch_sh, init, step, meta, conditional)


def train(config, workdir: str, *, stop_at: Optional[int] = None) -> dict:
    """Train until config.train.num_steps (or stop_at, for tests), resuming from workdir if it has a checkpoint.

    Returns {'step': final step, 'metrics': last logged metrics}.
    """
    from research.data import make_train_iterator, peek_shape

    validate_config(config)
    tc = config.train
    n_dev = jax.device_count()
    mesh = mesh_lib.make_mesh(tc.mesh_model)
    data_parallel = mesh.shape["data"]
    if tc.batch_size % data_parallel:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by the {data_parallel} data-parallel "
                          f"devices ({n_dev} devices, mesh_model={tc.mesh_model})")
    shape = tuple(peek_shape(config.data))  # raises a clear error for missing data
    want = (config.data.image_size, config.data.image_size, config.data.channels)
    if shape != want:
        raise ConfigError(f"the data has images of shape {shape} but the config says {want}; "
                          f"set data.image_size / data.channels to match")

    workdir = os.path.abspath(workdir)
    source, to_latents = None, None
    if latent_enabled(config):
        # Latent diffusion: the data stays pixels; the model trains on z ~ q(z|x) of the named autoencoder.
        from research.latents import latent_cache, load_run_autoencoder, make_latent_fn, resolve_latent_config
        config = resolve_latent_config(config)
        autoencoder = load_run_autoencoder(config)
        if config.latent.cache:
            source = latent_cache(config, autoencoder, "train", progress=tc.progress)
    write_run_files(config, workdir)
    trainer = build_trainer(config, mesh)
    model, batch_sh, meta = trainer.model, trainer.batch_sharding, trainer.meta
    conditional = trainer.conditional
    if latent_enabled(config):
        to_latents = make_latent_fn(autoencoder, cached=bool(config.latent.cache), seed=config.seed,
                                    out_sharding=batch_sh)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints)
    data_iter = make_train_iterator(config.data, global_batch_size=tc.batch_size, seed=config.seed,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    source=source)
    latest = ckpt.latest_step()
    if latest is not None:
        ckpt.check_compatible(latest, meta)
        state, data_state, _ = ckpt.restore(latest, trainer.abstract_state_sharded())
        if data_state:
            data_iter.set_state(data_state)
        log.info("resumed from step %d in %s", latest, workdir)
    else:
        state = trainer.init(jax.random.PRNGKey(config.seed))

    train_step = trainer.step
    start = int(jax.device_get(state.step))
    end = tc.num_steps if stop_at is None else min(stop_at, tc.num_steps)
    last_saved = latest
    generator = None
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    pending = []  # (step, device metrics) not yet checked for NaN
    last_metrics = {}
    t_last, step_last = time.time(), start
    is_main = jax.process_index() == 0

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
                    f"or set optim.grad_clip.")
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
        return rate

    bar = tqdm(total=end, initial=start, desc="train", disable=not (tc.progress and is_main), dynamic_ncols=True)
    try:
        for step in range(start, end):
            batch = mesh_lib.global_batch(next(data_iter), batch_sh)
            if to_latents is not None:
                batch["image"] = to_latents(batch["image"], step)
            if not conditional:
                batch.pop("label", None)
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
            if tc.sample_every and (done % tc.sample_every == 0 or done == end) and is_main:
                grid_path = os.path.join(workdir, "samples", f"step_{done:07d}.png")
                if trainer.write_preview is not None:
                    trainer.write_preview(state, grid_path)
                else:
                    if generator is None:
                        generator = Generator(model, config,
                                              batch_size=min(config.sample.num, config.sample.batch_size))
                    params = state.ema_params if config.sample.use_ema else state.params
                    samples, _, _ = generator.generate(params, min(config.sample.num, generator.batch_size),
                                                       seed=config.seed, progress=False)
                    save_grid(to_uint8(samples, config.data.centered), grid_path)
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
    final_step = int(jax.device_get(state.step))
    if config.task == "autoencoder" and final_step == tc.num_steps:
        # Computed from the finished run's checkpointed parameters and stored per step beside the checkpoints,
        # so a resumed run that finishes writes it too, and research.latents can recompute it for any step.
        from research.latents import ensure_latent_scale
        ensure_latent_scale(config, model, state.ema_params if config.sample.use_ema else state.params, workdir,
                            final_step, use_ema=config.sample.use_ema)
    return {"step": final_step, "metrics": last_metrics, "state": state}
