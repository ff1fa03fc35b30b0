"""task='controlnet': a ControlNet (Zhang, Rao & Agrawala 2023) trained on a frozen base diffusion run.

The base run (controlnet.base, a task='diffusion' run of the pixel-space U-Net, class-conditional or not) is
referenced, not copied: its parameters are read once, checked by digest at every resume (meta['frozen']['base']),
and never optimized. The trainable part 'net' is the ControlNet (research/models/controlnet.py): a copy of the
base's encoder and middle block, initialised from the base's weights, plus the hint encoder and the zero convs.
config.model names the ControlNet and its hint encoder (model.name='unet_controlnet', hint_channels,
hint_downsample, conditioning_channels); the base's architecture and its diffusion section are copied from the base
run's config.json when the run starts, so the saved config.json describes the control network whole.

Loss: L_simple of the base's prediction with the ControlNet's residuals added,
    eps_base(x_t, t, c, residuals = ControlNet(x_t, t, c, hint(x0)))  against the base's target,
with the hint computed from each training image (controlnet.hint: Canny / Sobel edges, a foreground mask or a
blurred image; research/data/hints.py) and the label dropped to the null label with probability
diffusion.cond_drop_prob (the paper drops 50% of the prompts so the control learns to read the hint alone).

Every preview writes a grid (rows: hint, controlled sample, base sample without control, for the first test images)
and one line of RUN/control.jsonl: the edge F1 of controlled samples against their hints on controlnet.eval_num
test images (research/metrics/control.py), the curve in which the paper sees its "sudden convergence".
`research.sample --workdir RUN` draws controlled samples for the hints of the first test images.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from research.cond import Cond, drop_condition
from research.config import ConfigError
from research.diffusion import gaussian
from research.sampling import schedule_from_config
from research.shapes import abstract_net_params, build_network, init_net_params, latent_enabled
from research.tasks import SampleOptions, Samples, Task, Trainer, register_task
from research.tasks.common import compile_trainer, model_meta
from research.tasks.diffusion import check_sample_options, options_generator, samples_name
from research.train import grads as grads_lib
from research.train import mesh as mesh_lib
from research.train.state import apply_gradients, ema_decay_at, init_train_state, learning_rate_schedule, make_optimizer

# ControlNet model name -> the base network it controls.
BASES = {"unet_controlnet": "unet", "cond_unet_controlnet": "cond_unet"}
HINT_FIELDS = ("name", "hint_channels", "hint_downsample", "conditioning_channels")
# The diffusion settings the ControlNet must share with its base (copied from the base run).
DIFFUSION_KEYS = ("schedule", "timesteps", "beta_start", "beta_end", "prediction", "var_type")
_COND_DROP_SALT = 0xC0D
NOT_SD = (
    "task='controlnet' trains ControlNets of pixel-space U-Net runs (model.name='unet_controlnet'); a Stable "
    "Diffusion ControlNet (cond_unet_controlnet) is not trained here: released ones load from diffusers folders "
    "for python -m research.generate --controlnet DIR"
)


def read_base_config(config):
    """The base run's config; ConfigError naming the fix when controlnet.base is not a usable run."""
    from research.run import read_config

    base = config.controlnet.base
    if not base:
        raise ConfigError("controlnet.base is empty: give the workdir of the base diffusion run to control")
    try:
        base_config = read_config(base)
    except ConfigError:
        raise ConfigError(
            f"controlnet.base={base!r} has no config.json: train the base first (e.g. python -m research.train "
            f"--config configs/controlnet_mnist.py:base --workdir {base})"
        ) from None
    if base_config.task != "diffusion" or base_config.model.name != "unet":
        raise ConfigError(
            f"controlnet.base={base!r} is a task={base_config.task!r} run of model.name={base_config.model.name!r}; "
            f"task='controlnet' trains on a task='diffusion' run of the U-Net (model.name='unet')"
        )
    if latent_enabled(base_config):
        raise ConfigError(
            f"controlnet.base={base!r} is a latent diffusion run; task='controlnet' trains on pixel-space bases "
            f"(latent bases are not implemented yet)"
        )
    if base_config.diffusion.var_type == "learned_range":
        raise ConfigError(f"controlnet.base={base!r} learns its variance; task='controlnet' needs a fixed variance")
    return base_config


def control_config(config, base_config):
    """config with the base's model fields (under the ControlNet's name and hint fields) and diffusion settings."""
    config = config.copy_and_resolve_references()
    model = {k: config.model[k] for k in HINT_FIELDS if k in config.model}
    base_model = base_config.model.to_dict()
    for key, value in config.model.items():
        if key in HINT_FIELDS:
            continue
        theirs = base_model.get(key)
        theirs = tuple(theirs) if isinstance(theirs, list) else theirs
        if key not in base_model or theirs != (tuple(value) if isinstance(value, list) else value):
            raise ConfigError(
                f"model.{key}={value!r} but the base run {config.controlnet.base} has {theirs!r}: the ControlNet "
                f"copies the base's architecture; leave model.{key} out (it is taken from the base)"
            )
    base_model.pop("name")
    with config.unlocked():
        config.model = ConfigDict({**base_model, **model})
    for key in DIFFUSION_KEYS:
        config.diffusion[key] = base_config.diffusion[key]
    return config


def check_data(config, base_config) -> None:
    for key in ("image_size", "channels", "centered"):
        if config.data[key] != base_config.data[key]:
            raise ConfigError(
                f"data.{key}={config.data[key]!r} but the base run was trained with {base_config.data[key]!r}; "
                f"the ControlNet sees the base's inputs"
            )
    if int(config.model.get("num_classes", 0)) and config.data.num_classes != config.model.num_classes:
        raise ConfigError(
            f"data.num_classes={config.data.num_classes} but the base is conditioned on {config.model.num_classes}"
        )


def load_base(config):
    """(base module, base params, reference {workdir, step, use_ema, sha256}) of the run's base."""
    from research.latents import params_digest
    from research.loader import load_run

    cn = config.controlnet
    _, base, params, step = load_run(cn.base, cn.base_step or None, use_ema=cn.base_use_ema)
    params = jax.device_get(params)
    reference = {
        "workdir": cn.base,
        "step": int(step),
        "use_ema": bool(cn.base_use_ema),
        "sha256": params_digest(params),
    }
    return base, params, reference


def initial_control_params(control_params, base_params):
    """The ControlNet's parameters with every entry it shares with the base (its encoder copy) taken from the base."""
    out = dict(control_params)
    for key, value in base_params.items():
        if key in out:
            mismatch = jax.tree.map(lambda a, b: a.shape != b.shape, out[key], value)
            if any(jax.tree.leaves(mismatch)):
                raise ValueError(f"the ControlNet's {key!r} does not have the base's shapes")
            out[key] = value
    return out


def control_hints(config, images):
    """The hint of images [B, H, W, C] (model range) for this run's controlnet.hint."""
    from research.data.hints import extract_hint

    return extract_hint(config.controlnet.hint, images)


def make_control_loss_fn(control, base, schedule, config):
    """loss(control params, batch, rng, base params) -> (loss, {})."""
    prediction, drop_prob = config.diffusion.prediction, float(config.diffusion.cond_drop_prob)
    null_label, classes = int(config.model.get("num_classes", 0)), bool(config.model.get("num_classes", 0))
    timesteps = jnp.asarray(schedule.timesteps, jnp.int32)

    def loss_fn(params, batch, rng, base_params):
        x0 = batch["image"]
        b = x0.shape[0]
        t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        hint = control_hints(config, x0)
        cond = Cond(label=batch["label"].astype(jnp.int32)) if classes else None
        if cond is not None and drop_prob > 0:
            cond = drop_condition(cond, jax.random.fold_in(rng, _COND_DROP_SALT), drop_prob, null_label=null_label)
        t = jax.random.randint(t_rng, (b,), 0, schedule.num_steps)
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        x_t = gaussian.q_sample(schedule, x0, t, noise)
        with_hint = Cond(hint=hint) if cond is None else cond.replace(hint=hint)
        residuals = control.apply(
            {"params": params}, x_t, timesteps[t], with_hint, train=True, rngs={"dropout": dropout_rng}
        )
        with_res = Cond(residuals=residuals) if cond is None else cond.replace(residuals=residuals)
        output = base.apply({"params": base_params}, x_t, timesteps[t], with_res, train=False)
        return jnp.mean(gaussian.simple_loss(schedule, x0, t, noise, output, prediction)), {}

    return loss_fn


def make_control_step(loss_fn, txs, lr_schedule, ema_decay: float, ema_warmup: bool, microbatches: int = 1):
    def train_step(state, batch, base_params):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, _), grads = grads_lib.value_and_grad(
            loss_fn,
            state.params["net"],
            batch,
            rng,
            base_params,
            microbatches=microbatches,
            loss_scale=state.loss_scale,
        )
        new_state = apply_gradients(state, {"net": grads}, txs, ema_decay_at(state.step, ema_decay, ema_warmup))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step)}
        return new_state, {**metrics, **grads_lib.scale_metrics(state)}

    return train_step


def controlled(base, control, config, scale=None, guess_mode=None):
    """The base and its ControlNet as one network for the samplers (research.models.controlnet.ControlledModel)."""
    from research.models.controlnet import ControlledModel

    cn = config.controlnet
    return ControlledModel(
        base,
        (control,),
        scales=float(cn.scale if scale is None else scale),
        guess_mode=bool(cn.guess_mode if guess_mode is None else guess_mode),
    )


def test_hints(config, num: int):
    """(hints [num, H, W, 1], labels [num], real images uint8 [num, H, W, C]) of the first num test images."""
    from research.data import DataError
    from research.data.sources import get_source, read_fields

    try:
        source = get_source(config.data, "test")
    except DataError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    num = min(num, len(source))
    fields = read_fields(source, np.arange(num))
    images = fields["image"]
    x = images.astype(np.float32) / 127.5 - 1.0 if config.data.centered else images.astype(np.float32) / 255.0
    hints = np.asarray(jax.jit(lambda x: control_hints(config, x))(x))
    return hints, fields["label"].astype(np.int32), images


@register_task("controlnet")
class ControlNetTask(Task):
    gradient_options = True

    def validate(self, config) -> None:
        from research.data.hints import HINTS
        from research.models.registry import check_input_shape
        from research.shapes import model_input_shape

        cn = config.controlnet
        if config.model.name not in BASES:
            raise ConfigError(
                f"task='controlnet' trains a ControlNet: model.name must be one of {sorted(BASES)}, not "
                f"{config.model.name!r}"
            )
        if cn.hint not in HINTS:
            raise ConfigError(f"controlnet.hint={cn.hint!r} is not valid; choose one of {list(HINTS)}")
        if not 0.0 <= config.diffusion.cond_drop_prob < 1.0:
            raise ConfigError(f"diffusion.cond_drop_prob={config.diffusion.cond_drop_prob} must be in [0, 1)")
        if int(cn.eval_num) < 0:
            raise ConfigError(f"controlnet.eval_num={cn.eval_num} must be >= 0")
        if config.model.name == "cond_unet_controlnet":
            # Stable Diffusion's ControlNet (configs/controlnet_sd15.py): the config describes the architecture
            # (research.summary); training one needs a text-to-image base, which this task does not take yet.
            if cn.base:
                raise ConfigError(NOT_SD)
            try:
                check_input_shape(config.model, model_input_shape(config))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            build_network(config)
            return
        base_config = read_base_config(config)
        full = control_config(config, base_config)
        check_data(full, base_config)
        if int(full.model.get("conditioning_channels", 0) or 0) not in (0, 1):
            raise ConfigError(
                f"model.conditioning_channels={full.model.conditioning_channels}: the hints have 1 channel"
            )
        if int(full.model.get("num_classes", 0)) and config.diffusion.cond_drop_prob > 0:
            if not full.model.get("null_label", False):
                raise ConfigError("diffusion.cond_drop_prob > 0 needs a base with a null label (model.null_label)")
        if not config.data.centered:
            raise ConfigError("the hints are computed from images in [-1, 1]: task='controlnet' needs data.centered")
        try:
            build_network(full)
            check_input_shape(full.model, model_input_shape(full))
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def resolve(self, config):
        if not config.controlnet.base:
            return config
        config = config.copy_and_resolve_references()
        config.controlnet.base = os.path.abspath(config.controlnet.base)
        full = control_config(config, read_base_config(config))
        if not full.controlnet.base_step:
            from research.run import resolve_step

            full.controlnet.base_step = int(resolve_step(full.controlnet.base))
        return full

    def network_config(self, config):
        return self.resolve(config)

    def build_trainer(self, config, mesh) -> Trainer:
        if config.model.name != "unet_controlnet" or not config.controlnet.base:
            raise ConfigError(NOT_SD if config.model.name == "cond_unet_controlnet" else "controlnet.base is empty")
        config = self.resolve(config)  # the base's architecture (a no-op on a run's saved, resolved config)
        tc = config.train
        control = build_network(config)
        base, base_params, reference = load_base(config)
        schedule = schedule_from_config(config.diffusion)
        txs = {"net": make_optimizer(config.optim, tc.num_steps)}
        lr_schedule = learning_rate_schedule(config.optim, tc.num_steps)
        loss_fn = make_control_loss_fn(control, base, schedule, config)
        step_fn = make_control_step(loss_fn, txs, lr_schedule, tc.ema_decay, tc.ema_warmup, tc.grad_accum)
        loss_scale = grads_lib.loss_scale_for(config)

        def init(key, base_params):
            params = initial_control_params(init_net_params(control, config, key), base_params)
            return init_train_state({"net": params}, txs, config.seed, loss_scale=loss_scale)

        abstract = jax.eval_shape(
            lambda p: init_train_state({"net": p}, txs, config.seed, loss_scale=loss_scale),
            abstract_net_params(control, config),
        )
        meta = model_meta(config, abstract)
        meta["frozen"] = {"base": reference}
        base_sh = mesh_lib.frozen_shardings(mesh, "base", base_params, config.train)
        trainer = compile_trainer(config, mesh, control, abstract, init, step_fn, meta, step_extra_args=(base_sh,))
        on_mesh = jax.device_put(base_params, base_sh)
        init_program, step_program = trainer.init, trainer.step
        trainer.init = lambda key: init_program(key, on_mesh)
        trainer.step = lambda state, batch: step_program(state, batch, on_mesh)
        trainer.schedule = schedule
        trainer.context = {"base": base, "base_params": base_params}
        return trainer

    def preview(self, config, trainer):
        from research.images import save_grid
        from research.metrics.control import edge_scores
        from research.sampling import Generator, to_uint8

        num = min(config.sample.num, config.sample.batch_size, 10)
        evaluate = int(config.controlnet.eval_num)
        hints, labels, _ = test_hints(config, max(num, evaluate))
        base, base_params = trainer.context["base"], trainer.context["base_params"]
        holder = {}
        log_path = None

        def write(state, path):
            nonlocal log_path
            if "gen" not in holder:
                batch = min(config.sample.batch_size, max(num, evaluate))
                holder["gen"] = Generator(controlled(base, trainer.model, config), config, batch_size=batch)
                holder["base"] = Generator(base, config, batch_size=num)
            params = {"base": base_params, "controls": (state.sampling_params("net", config.sample.use_ema),)}
            n = max(num, evaluate)
            samples, _, _ = holder["gen"].generate(
                params, n, seed=config.seed, labels=labels[:n], hints=hints[:n], progress=False
            )
            plain, _, _ = holder["base"].generate(
                base_params, num, seed=config.seed, labels=labels[:num], progress=False
            )
            pixels = to_uint8(samples, config.data.centered)
            hint_rows = (np.asarray(hints[:num]) * 255).round().clip(0, 255).astype(np.uint8)
            if hint_rows.shape[-1] != pixels.shape[-1]:
                hint_rows = np.repeat(hint_rows, pixels.shape[-1], axis=-1)
            grid = np.concatenate([hint_rows, pixels[:num], to_uint8(plain, config.data.centered)])
            out = save_grid(grid, path, ncols=num)
            if evaluate:
                x = samples[:evaluate]
                edges = np.asarray(control_hints(config, jnp.asarray(x)))
                scores = edge_scores(edges, hints[:evaluate]).means()
                scores["f1_exact"] = edge_scores(edges, hints[:evaluate], tolerance=0).means()["f1"]
                step = int(jax.device_get(state.step))
                log_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "control.jsonl")
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "num": evaluate, **scores}) + "\n")
            return out

        return write

    def sampler(self, workdir: str, config, options: SampleOptions):
        from research.loader import load_run
        from research.sampling import to_uint8

        if options.classifier is not None:
            raise ConfigError("classifier guidance of a ControlNet run is not supported: drop --classifier")
        check_sample_options(config, options)
        _, control, params, step = load_run(workdir, options.step, use_ema=options.use_ema)
        base, base_params, reference = load_base(config)
        if step:
            from research.run import read_meta

            saved = (read_meta(workdir, step).get("frozen") or {}).get("base") or {}
            if saved.get("sha256") not in (None, reference["sha256"]):
                raise ConfigError(
                    f"the base run {config.controlnet.base} changed since {workdir} was trained on it "
                    f"(weights digest {reference['sha256'][:12]} vs {saved['sha256'][:12]})"
                )
        model = controlled(base, control, config)
        both = {"base": base_params, "controls": (params,)}

        def run(num, seed=0, progress=True):
            hints, labels, _ = test_hints(config, num)
            gen = options_generator(model, config, options, num)
            num_classes = int(config.model.get("num_classes", 0))
            samples, _, nfe = gen.generate(
                both, len(hints), seed=seed, labels=labels if num_classes else None, hints=hints, progress=progress
            )
            return Samples(
                to_uint8(samples, config.data.centered),
                labels,
                nfe,
                "controlled_" + samples_name(gen, config, options, seed),
                f"step {step} with {gen.sampler} ({gen.num_steps} steps, NFE={nfe}), {config.controlnet.hint} hints "
                f"of the first {len(hints)} test images, control scale {config.controlnet.scale:g}",
            )

        run.step = step
        return run
