"""task='diffusion': a denoising network trained with the configured loss, in pixel or latent space.

Loss (diffusion.loss):
  simple  Ho et al.'s L_simple: unweighted MSE on the eps / x0 / v target.
  hybrid  iDDPM's L_simple + vlb_weight * L_vlb; L_vlb sees the mean stop-gradiented, so it trains only
          the variance head of a learned_range model.
  vlb     L_vlb alone (iDDPM's rescaled KL), optionally with importance-sampled t (the loss history lives in
          the state's `extra`).
Conditioning: the batch's labels become `Cond(label=...)`; with diffusion.cond_drop_prob > 0 each example's
condition is replaced by the null condition with that probability (classifier-free guidance training), for any
backbone that has a null label (model.null_label).
Latent diffusion (latent.autoencoder set): the autoencoder is a frozen part; the training split is encoded once to
a cache (or every batch on the fly) and the batch's images become z ~ q(z|x) before the step; samples are decoded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research.cond import Cond, drop_condition
from research.config import ConfigError
from research.diffusion import gaussian, likelihood
from research.sampling import schedule_from_config
from research.shapes import abstract_net_params, build_network, init_net_params, latent_enabled
from research.tasks import SampleOptions, Samples, Task, Trainer, default_labels, register_task
from research.tasks.common import compile_trainer, model_meta, validate_network
from research.train import grads as grads_lib
from research.train.state import apply_gradients, ema_decay_at, init_train_state, learning_rate_schedule, make_optimizer

# Salt of the condition-dropout key: fold_in(step key, salt), so runs without dropout keep their random streams.
_COND_DROP_SALT = 0xC0D


def conditional(config) -> bool:
    return bool(config.model.get("num_classes", 0))


def batch_cond(batch, config):
    """The model's Cond for a training batch (None for an unconditional model)."""
    return Cond(label=batch["label"]) if conditional(config) else None


def make_loss_fn(model, schedule, config):
    """loss(params, batch, rng, t_sampler_state) -> (scalar loss, aux dict with per-example terms)."""
    dc = config.diffusion
    prediction, loss_kind, var_type, vlb_weight = dc.prediction, dc.loss, dc.var_type, dc.vlb_weight
    importance = dc.t_sampling == "importance"
    num_steps = schedule.num_steps
    drop_prob = float(dc.cond_drop_prob)
    null_label = int(config.model.get("num_classes", 0))

    def loss_fn(params, batch, rng, t_sampler_state):
        x0 = batch["image"]
        batch_size, channels = x0.shape[0], x0.shape[-1]
        t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        if importance:
            t, weights = likelihood.importance_sample(t_sampler_state, t_rng, batch_size)
        else:
            t = jax.random.randint(t_rng, (batch_size,), 0, num_steps)
            weights = jnp.ones((batch_size,), jnp.float32)
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        x_t = gaussian.q_sample(schedule, x0, t, noise)
        cond = batch_cond(batch, config)
        if cond is not None and drop_prob > 0:
            cond = drop_condition(cond, jax.random.fold_in(rng, _COND_DROP_SALT), drop_prob, null_label=null_label)
        t_model = jnp.asarray(schedule.timesteps, jnp.int32)[t]
        output = model.apply({"params": params}, x_t, t_model, cond, train=True, rngs={"dropout": dropout_rng})
        aux = {}
        if loss_kind == "simple":
            per_example = gaussian.simple_loss(schedule, x0, t, noise, output[..., :channels], prediction)
        elif loss_kind == "hybrid":
            per_example, simple, vlb = likelihood.hybrid_loss(
                schedule, x0, t, noise, output, prediction=prediction, vlb_weight=vlb_weight
            )
            aux = {"loss_simple": simple.mean(), "vlb_bpd_per_step": vlb.mean() / num_steps}
        else:
            per_example = likelihood.vlb_loss(schedule, x0, t, noise, output, prediction=prediction, var_type=var_type)
        return jnp.mean(weights * per_example), {"per_example": per_example, "t": t, **aux}

    return loss_fn


def make_train_step(loss_fn, txs, lr_schedule, ema_decay: float, ema_warmup: bool = False, microbatches: int = 1):
    def train_step(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        t_sampler = state.extra
        (loss, aux), grads = grads_lib.value_and_grad(
            loss_fn, state.params["net"], batch, rng, t_sampler, microbatches=microbatches, loss_scale=state.loss_scale
        )
        if t_sampler is not None:
            # The history holds unweighted losses: the sampling probabilities estimate E[L_t^2] per t.
            t_sampler = likelihood.importance_update(t_sampler, aux["t"], jax.lax.stop_gradient(aux["per_example"]))
        new_state = apply_gradients(
            state,
            {"net": grads},
            txs,
            ema_decay_at(state.step, ema_decay, ema_warmup),
            keep_extra=False,
            extra=t_sampler,
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": lr_schedule(state.step),
            **grads_lib.scale_metrics(state),
            **{k: v for k, v in aux.items() if k not in ("per_example", "t")},
        }
        return new_state, metrics

    return train_step


@register_task("diffusion")
class DiffusionTask(Task):
    gradient_options = True

    def validate(self, config) -> None:
        validate_network(config)
        d = config.diffusion
        if not 0.0 <= d.cond_drop_prob < 1.0:
            raise ConfigError(f"diffusion.cond_drop_prob={d.cond_drop_prob} must be in [0, 1)")
        if d.cond_drop_prob > 0:
            if not conditional(config):
                raise ConfigError(
                    "diffusion.cond_drop_prob > 0 drops the condition of a conditional model: set "
                    "model.num_classes (or cond_drop_prob=0 for an unconditional model)"
                )
            if not config.model.get("null_label", False):
                raise ConfigError(
                    "diffusion.cond_drop_prob > 0 replaces labels by the null label: set "
                    "model.null_label=True so the model has an embedding for it"
                )
        _validate_latent(config)

    def resolve(self, config):
        if not latent_enabled(config):
            return config
        from research.latents import resolve_latent_config

        return resolve_latent_config(config)

    def build_trainer(self, config, mesh) -> Trainer:
        tc = config.train
        model = build_network(config)
        schedule = schedule_from_config(config.diffusion)
        txs = {"net": make_optimizer(config.optim, tc.num_steps)}
        lr_schedule = learning_rate_schedule(config.optim, tc.num_steps)
        step_fn = make_train_step(
            make_loss_fn(model, schedule, config), txs, lr_schedule, tc.ema_decay, tc.ema_warmup, tc.grad_accum
        )
        loss_scale = grads_lib.loss_scale_for(config)

        def t_sampler():
            if config.diffusion.t_sampling == "importance":
                return likelihood.importance_init(schedule.num_steps)
            return None

        def init(key):
            params = {"net": init_net_params(model, config, key)}
            return init_train_state(params, txs, config.seed, extra=t_sampler(), loss_scale=loss_scale)

        abstract = jax.eval_shape(
            lambda p: init_train_state({"net": p}, txs, config.seed, extra=t_sampler(), loss_scale=loss_scale),
            abstract_net_params(model, config),
        )
        meta = model_meta(config, abstract)
        context = {}
        if latent_enabled(config):
            context["autoencoder"], reference = frozen_autoencoder(config)
            meta["frozen"] = {"autoencoder": reference}
        trainer = compile_trainer(config, mesh, model, abstract, init, step_fn, meta)
        trainer.schedule, trainer.context = schedule, context
        return trainer

    def data_source(self, config, trainer):
        if latent_enabled(config) and config.latent.cache:
            from research.latents import latent_cache

            return latent_cache(config, trainer.context["autoencoder"], "train", progress=config.train.progress)
        return None

    def batch_preparer(self, config, trainer):
        if not latent_enabled(config):
            return None
        from research.latents import make_latent_fn

        to_latents = make_latent_fn(
            trainer.context["autoencoder"],
            cached=bool(config.latent.cache),
            seed=config.seed,
            out_sharding=trainer.batch_sharding,
            train_config=config.train,
        )

        def prepare(batch, step):
            arrays = {k: v for k, v in batch.items() if isinstance(v, jax.Array)}  # text fields are not used here
            return dict(arrays, image=to_latents(batch["image"], step))

        return prepare

    def preview(self, config, trainer):
        from research.images import save_grid
        from research.sampling import Generator, to_uint8

        holder = {}

        def write(state, path):
            if "generator" not in holder:
                holder["generator"] = Generator(
                    trainer.model,
                    config,
                    batch_size=min(config.sample.num, config.sample.batch_size),
                    autoencoder=trainer.context.get("autoencoder"),
                )
            gen = holder["generator"]
            params = state.sampling_params("net", config.sample.use_ema)
            samples, _, _ = gen.generate(
                params, min(config.sample.num, gen.batch_size), seed=config.seed, progress=False
            )
            return save_grid(to_uint8(samples, config.data.centered), path)

        return write

    def sampler(self, workdir: str, config, options: SampleOptions):
        from research.loader import load_run
        from research.sampling import to_uint8

        check_sample_options(config, options)
        _, model, params, step = load_run(workdir, options.step, use_ema=options.use_ema)
        num_classes = int(config.model.get("num_classes", 0))
        guide = load_classifier(options.classifier, options.classifier_scale, config, num_classes, options.use_ema)
        if guide is not None:
            num_classes = int(guide[0].num_classes)

        def run(num, seed=0, progress=True):
            gen = options_generator(model, config, options, num, classifier=guide)
            labels = default_labels(num, num_classes)
            samples, _, nfe = gen.generate(
                params, num, seed=seed, labels=labels if num_classes else None, progress=progress
            )
            return Samples(
                to_uint8(samples, config.data.centered),
                labels,
                nfe,
                samples_name(gen, config, options, seed),
                f"step {step} with {gen.sampler} ({gen.num_steps} steps, eta={gen.eta:g}, NFE={nfe})",
            )

        run.step = step
        return run


def frozen_autoencoder(config):
    """(the run's autoencoder, its checkpoint reference {workdir, step, use_ema, sha256}) for a latent run."""
    from research.latents import load_run_autoencoder

    ae = load_run_autoencoder(config)
    reference = {
        "workdir": config.latent.autoencoder,
        "step": int(ae.step),
        "use_ema": bool(config.latent.use_ema),
        "sha256": ae.digest,
    }
    return ae, reference


def check_sample_options(config, options: SampleOptions) -> None:
    """Refuse, with the fix, options of `research.sample` that the sampler they name cannot take."""
    name = options.sampler or config.sample.sampler
    if options.sigmas is not None:
        raise ConfigError(
            "--sigmas picks a consistency model's noise levels (a cd or ct run); this run samples on --steps "
            "(drop --sigmas)"
        )
    if options.eta is not None and name != "ddim":
        raise ConfigError(f"--eta is DDIM's; the {name!r} sampler has none (drop --eta or use --sampler ddim)")
    if options.grid is not None and name in ("ddpm", "ddim"):
        raise ConfigError(f"--grid picks a solver's time grid; {name!r} runs on --steps (drop --grid)")
    if options.steps is not None:
        from research.sampling import sampling_schedule

        try:
            sampling_schedule(schedule_from_config(config.diffusion), options.steps)
        except ValueError as e:
            raise ConfigError(f"--steps {options.steps}: {e}") from None


def options_generator(model, config, options: SampleOptions, num: int, **kw):
    """The Generator `research.sample`'s options describe, for batches of at most num samples."""
    from research.sampling import Generator

    return Generator(
        model,
        config,
        sampler=options.sampler,
        steps=options.steps,
        eta=options.eta,
        batch_size=min(options.batch_size or config.sample.batch_size, num),
        guidance=options.guidance,
        guidance_rescale=options.guidance_rescale,
        grid=options.grid,
        **kw,
    )


def samples_name(gen, config, options: SampleOptions, seed: int) -> str:
    """The file stem of a sample set: sampler, steps, eta, solver grid, guidance scales and seed."""
    steps_name = str(options.steps if options.steps is not None else config.sample.steps).replace(",", "-")
    guided = f"_cfg{gen.guidance:g}" if gen.guidance is not None else ""
    if gen.classifier_scale is not None:
        guided += f"_clf{gen.classifier_scale:g}"
    if gen.sampler not in ("ddpm", "ddim"):
        guided = f"_{options.grid or config.sample.grid}{guided}"
    return f"samples_{gen.sampler}_{steps_name}_eta{gen.eta:g}{guided}_seed{seed}"


def load_classifier(classifier, scale, config, num_classes: int, use_ema: bool):
    """(model, params, scale) of a noise-aware classifier run for classifier guidance, or None without one."""
    if classifier is None:
        return None
    from research.loader import load_run
    from research.run import read_config

    if not scale >= 0:
        raise ConfigError(f"--classifier-scale must be >= 0 (0: no guidance), got {scale}")
    clf_config = read_config(classifier)
    if clf_config.task != "noisy_classifier":
        raise ConfigError(f"--classifier {classifier} is a {clf_config.task!r} run, not a noisy_classifier run")
    if latent_enabled(config):
        raise ConfigError("classifier guidance of a latent diffusion run is not supported (the classifier sees pixels)")
    ours, theirs = schedule_from_config(config.diffusion), schedule_from_config(clf_config.diffusion)
    if ours.num_steps != theirs.num_steps or not (ours.alphas_cumprod == theirs.alphas_cumprod).all():
        raise ConfigError(
            f"--classifier {classifier} was trained on the {clf_config.diffusion.schedule!r} schedule with "
            f"T={clf_config.diffusion.timesteps}, this run on {config.diffusion.schedule!r} with "
            f"T={config.diffusion.timesteps}: train the classifier with this run's diffusion section"
        )
    if tuple(clf_config.data.to_dict()[k] for k in ("image_size", "channels")) != (
        config.data.image_size,
        config.data.channels,
    ):
        raise ConfigError(f"--classifier {classifier} classifies other images than this run generates")
    k = int(clf_config.model.num_classes)
    if num_classes and k != num_classes:
        raise ConfigError(f"--classifier {classifier} has {k} classes but this run's model has {num_classes}")
    _, clf_model, clf_params, _ = load_run(classifier, None, use_ema=use_ema)
    return clf_model, clf_params, float(scale)


def _validate_latent(config) -> None:
    lat = config.latent
    if not lat.autoencoder:
        return
    for key in ("step", "downsample_factor", "channels"):
        if lat[key] < 0:
            raise ConfigError(f"latent.{key} must be >= 0, got {lat[key]}")
    if lat.normalization not in ("scale", "channel"):
        raise ConfigError(
            f"latent.normalization={lat.normalization!r} is not valid; choose one of ['scale', 'channel']"
        )
    if config.sample.clip_x0:
        raise ConfigError(
            "latents are not bounded to [-1, 1], so clipping the x0 prediction would distort them: "
            "set sample.clip_x0=False for a latent diffusion run"
        )
    if lat.cache and config.data.random_flip:
        raise ConfigError(
            "the latent cache stores the encodings of unflipped images: set latent.cache=False "
            "(encode every batch, flips included) or data.random_flip=False"
        )
