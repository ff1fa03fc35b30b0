"""fewstep.method='add': adversarial diffusion distillation (Sauer et al. 2023) wired into the training loop.

The math is research/diffusion/adversarial.py, the discriminator research/models/discriminator.py; this module
builds the state, the compiled step and the student's sampler. It is a method of task 'fewstep' (as PD, CD and CT
are), so the teacher keys (fewstep.teacher_workdir, teacher_step, teacher_use_ema), `research.sample --steps k`,
the preview and experiments/fewstep_table.py work on it unchanged; the ADD keys are the config's `add` section.

State. params = {'net': the student (starts as the teacher), 'disc': the discriminator heads}; only 'net' keeps
an EMA (train.ema_decay, used for sampling). 'net' has the config's optimizer (config.optim), 'disc' its own Adam
(add.disc_lr, b1 = 0, b2 = 0.99, constant rate). Frozen (read once, referenced by sha256 in the checkpoint
metadata and checked on resume): the teacher and the feature network.

One training step, on a batch of real images x0 (and labels when the teacher is class-conditional):
  1. s ~ U(add_timesteps(T, add.student_timesteps)), x_s = q_sample(x0, s, eps): the student's input;
  2. add.disc_steps discriminator updates: hinge loss on D(x0) vs D(sg(x0_theta(x_s))) + r1_gamma / 2 * R1(x0);
  3. one student update: adversarial_weight * (-D(x0_theta)) + distill_weight * c(t) ||x0_theta - sg(x0_teacher)||^2,
     the teacher's x0 read at a random t from x0_theta re-noised (guided with add.teacher_guidance).
Logged: d_loss, r1, d_accuracy (real > 0 and fake < 0, before the update), g_adv, distill, loss (the student's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research.cond import Cond
from research.config import ConfigError
from research.diffusion import adversarial as adv
from research.diffusion import gaussian
from research.diffusion.guidance import guided_denoiser, null_like
from research.diffusion.sampling_common import SampleResult
from research.models.discriminator import (
    FEATURE_NETWORKS,
    DiscriminatorHeads,
    FeatureNetwork,
    capture,
)
from research.train import mesh as mesh_lib
from research.train.state import TrainState, apply_gradients, ema_decay_at, init_train_state


def validate_add(config) -> None:
    a = config.add
    if a.features not in FEATURE_NETWORKS:
        raise ConfigError(f"add.features={a.features!r} is not valid; choose one of {list(FEATURE_NETWORKS)}")
    if a.weighting not in adv.WEIGHTINGS:
        raise ConfigError(f"add.weighting={a.weighting!r} is not valid; choose one of {list(adv.WEIGHTINGS)}")
    if not 1 <= a.student_timesteps <= config.diffusion.timesteps:
        raise ConfigError(f"add.student_timesteps must be in [1, diffusion.timesteps], got {a.student_timesteps}")
    if not 1 <= config.fewstep.sample_steps <= a.student_timesteps:
        raise ConfigError(
            f"fewstep.sample_steps={config.fewstep.sample_steps} must be in [1, add.student_timesteps="
            f"{a.student_timesteps}]"
        )
    if min(a.distill_weight, a.adversarial_weight, a.r1_gamma) < 0 or a.distill_weight + a.adversarial_weight <= 0:
        raise ConfigError(
            "add.distill_weight, adversarial_weight and r1_gamma must be >= 0, and the two weights not both 0"
        )
    if a.disc_steps < 1 or a.disc_lr <= 0 or a.disc_width < 1:
        raise ConfigError("add.disc_steps and add.disc_width must be >= 1 and add.disc_lr > 0")
    if not 0 <= a.feature_t < config.diffusion.timesteps:
        raise ConfigError(f"add.feature_t must be a timestep in [0, {config.diffusion.timesteps}), got {a.feature_t}")
    if a.teacher_guidance != 1.0 and not config.model.get("null_label", False):
        raise ConfigError(
            f"add.teacher_guidance={a.teacher_guidance} needs a teacher trained with a null label "
            f"(model.null_label=True); use 1.0"
        )


def classifier_features(dataset: str, centered: bool = True) -> FeatureNetwork:
    """The domain classifier of `dataset` (trained and cached on first use) as a feature network."""
    from research.metrics.classifier import SmallCNN, get_domain_classifier

    clf = get_domain_classifier(dataset, progress=False)
    net = SmallCNN.from_recipe(clf.recipe)
    names = [f"Conv_{i}" for i in range(len(clf.recipe.widths) * clf.recipe.convs_per_stage)] + ["features"]

    def features(params, x, key=None, labels=None):
        x = x if centered else 2.0 * x - 1.0
        return capture(net, {"params": params}, names, x, train=False)

    size, ch = clf.recipe.image_size, clf.recipe.channels
    shapes = [f.shape for f in jax.eval_shape(lambda p: features(p, jnp.zeros((1, size, size, ch))), clf.params)]
    reference = {"kind": "classifier", "name": clf.name, "sha256": clf.checksum, "layers": names}
    return FeatureNetwork("classifier", features, clf.params, reference, shapes)


def teacher_features(model, params, schedule, model_config, image_shape, feature_t: int, reference: dict):
    """The teacher U-Net's encoder features at timestep feature_t (x re-noised with the key's noise)."""
    if model_config.get("name") != "unet":
        raise ValueError(f"the 'teacher' feature network reads a 'unet' teacher's encoder, not {model_config['name']}")
    levels, blocks = len(model_config["ch_mult"]), int(model_config["num_res_blocks"])
    names = [f"down{level}_res{blocks - 1}" for level in range(levels)] + ["mid_res1"]
    conditional = bool(model_config.get("num_classes", 0))

    def features(p, x, key, labels=None):
        b = x.shape[0]
        t = jnp.full((b,), int(feature_t), jnp.int32)
        x_t = gaussian.q_sample(schedule, x, t, jax.random.normal(key, x.shape, x.dtype))
        cond = Cond(label=labels) if conditional else None
        return capture(model, {"params": p}, names, x_t, t, cond, train=False)

    labels = jnp.zeros((1,), jnp.int32)
    shapes = [
        f.shape
        for f in jax.eval_shape(
            lambda p: features(p, jnp.zeros((1, *image_shape)), jax.random.PRNGKey(0), labels), params
        )
    ]
    return FeatureNetwork("teacher", features, params, dict(reference, layers=names, feature_t=int(feature_t)), shapes)


def disc_optimizer(config) -> optax.GradientTransformation:
    return optax.adam(float(config.add.disc_lr), b1=0.0, b2=0.99)


def build_feature_network(config, model, teacher_params, schedule, teacher_reference: dict):
    from research.shapes import model_input_shape

    if config.add.features == "classifier":
        try:
            return classifier_features(config.data.name, centered=bool(config.data.centered))
        except ValueError as e:
            raise ConfigError(f"add.features='classifier': {e}") from None
    return teacher_features(
        model,
        teacher_params,
        schedule,
        config.model.to_dict(),
        model_input_shape(config),
        int(config.add.feature_t),
        {k: teacher_reference[k] for k in ("workdir", "step", "sha256")},
    )


def student_x0_fn(model, params, prediction: str, schedule, *, train: bool = False, dropout_rng=None):
    """(x_t, t [B], cond) -> the x0 the network predicts (unclipped)."""
    rngs = {"dropout": dropout_rng} if train else None

    def x0(x_t, t, cond):
        out = model.apply({"params": params}, x_t, t, cond, train=train, rngs=rngs)
        return adv.x0_from_output(schedule, x_t, t, out, prediction)

    return x0


def teacher_x0_fn(config, model, params, schedule):
    """The frozen teacher's x0 prediction, guided by add.teacher_guidance against the null label."""
    prediction, scale = config.diffusion.prediction, float(config.add.teacher_guidance)

    def denoise(x_t, t, cond):
        return model.apply({"params": params}, x_t, t, cond, train=False)

    def x0(x_t, t, cond):
        fn = denoise
        if scale != 1.0:
            null = null_like(cond, int(config.model.num_classes))
            fn = guided_denoiser(
                denoise, null, scale=scale, prediction=prediction, schedule=schedule, channels=x_t.shape[-1]
            )
        return adv.x0_from_output(schedule, x_t, t, fn(x_t, t, cond), prediction)

    return x0


def make_add_step(config, model, schedule, heads, feature_net, txs, lr_schedule, conditional: bool):
    """(state, batch, frozen {'teacher', 'features'}) -> (state, metrics)."""
    a, tc = config.add, config.train
    prediction = config.diffusion.prediction
    student_t = jnp.asarray(adv.add_timesteps(schedule.num_steps, a.student_timesteps))
    gamma = float(a.r1_gamma)

    def step(state: TrainState, batch, frozen):
        rng = jax.random.fold_in(state.rng, state.step)
        s_key, noise_key, drop_key, dist_key, feat_key = jax.random.split(rng, 5)
        x0 = batch["image"]
        labels = batch["label"] if conditional else None
        cond = Cond(label=labels) if conditional else None
        b = x0.shape[0]
        s = student_t[jax.random.randint(s_key, (b,), 0, student_t.shape[0])]
        x_s = gaussian.q_sample(schedule, x0, s, jax.random.normal(noise_key, x0.shape, x0.dtype))

        def student(params):
            return student_x0_fn(model, params, prediction, schedule, train=True, dropout_rng=drop_key)(x_s, s, cond)

        def features(x):
            return feature_net.features(frozen["features"], x, feat_key, labels)

        def logits(disc_params, x):
            return heads.apply({"params": disc_params}, features(x), labels)

        # The frozen network's features of the real and the (detached) fake batch do not depend on the heads: read
        # once for all add.disc_steps updates (R1 differentiates through them, so it reads the real batch itself).
        real_feats = features(x0)
        fake_feats = features(jax.lax.stop_gradient(student(state.params["net"])))

        def d_loss_fn(disc_params):
            real_logits = heads.apply({"params": disc_params}, real_feats, labels)
            fake_logits = heads.apply({"params": disc_params}, fake_feats, labels)
            loss = adv.hinge_discriminator_loss(real_logits, fake_logits)
            r1 = jnp.zeros(())
            if gamma > 0:
                r1 = adv.r1_penalty(lambda x: adv.example_scores(logits(disc_params, x)), x0)
            accuracy = adv.discriminator_accuracy(real_logits, fake_logits)
            return loss + 0.5 * gamma * r1, (loss, r1, accuracy)

        d_metrics = None
        for _ in range(int(a.disc_steps)):
            (_, aux), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.params["disc"])
            d_metrics = aux if d_metrics is None else d_metrics
            state = apply_gradients(state, {"disc": d_grads}, txs, 1.0, step_increment=False)
        teacher = teacher_x0_fn(config, model, frozen["teacher"], schedule)

        def g_loss_fn(params):
            x0_theta = student(params)
            g_adv = jnp.zeros(())
            if a.adversarial_weight > 0:
                g_adv = adv.generator_adversarial_loss(logits(state.params["disc"], x0_theta))
            distill = jnp.zeros(())
            if a.distill_weight > 0:
                distill = jnp.mean(
                    adv.distillation_loss(schedule, teacher, x0_theta, dist_key, cond, weighting=a.weighting)
                )
            return a.adversarial_weight * g_adv + a.distill_weight * distill, (g_adv, distill)

        (loss, (g_adv, distill)), grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state.params["net"])
        new_state = apply_gradients(state, {"net": grads}, txs, ema_decay_at(state.step, tc.ema_decay, tc.ema_warmup))
        d_loss, r1, accuracy = d_metrics
        metrics = {
            "loss": loss,
            "g_adv": g_adv,
            "distill": distill,
            "d_loss": d_loss,
            "r1": r1,
            "d_accuracy": accuracy,
            "grad_norm": optax.global_norm(grads),
            "lr": lr_schedule(state.step),
        }
        return new_state, metrics

    return step


def build_add_trainer(config, mesh):
    """The Trainer of fewstep.method='add' (see the module docstring)."""
    from research.latents import params_digest
    from research.sampling import schedule_from_config
    from research.shapes import abstract_net_params, build_network
    from research.tasks.common import compile_trainer, model_meta
    from research.tasks.teacher import load_teacher
    from research.train.state import learning_rate_schedule, make_optimizer

    f, tc = config.fewstep, config.train
    model = build_network(config)
    schedule = schedule_from_config(config.diffusion)
    conditional = bool(config.model.get("num_classes", 0))
    teacher, teacher_step = load_teacher(config)
    teacher_ref = {
        "workdir": f.teacher_workdir,
        "step": int(teacher_step),
        "use_ema": bool(f.teacher_use_ema),
        "sha256": params_digest(teacher),
    }
    feature_net = build_feature_network(config, model, teacher, schedule, teacher_ref)
    heads = DiscriminatorHeads(
        feature_net.num_heads, int(config.add.disc_width), int(config.data.num_classes) if conditional else 0
    )
    txs = {"net": make_optimizer(config.optim, tc.num_steps), "disc": disc_optimizer(config)}
    lr_schedule = learning_rate_schedule(config.optim, tc.num_steps)

    def init_heads(key):
        feats = [jnp.zeros((1, *shape[1:]), jnp.float32) for shape in feature_net.shapes]
        return heads.init(key, feats, jnp.zeros((1,), jnp.int32) if conditional else None)["params"]

    def make_state(net_params, key):
        return init_train_state({"net": net_params, "disc": init_heads(key)}, txs, config.seed)

    abstract_state = jax.eval_shape(make_state, abstract_net_params(model, config), jax.random.PRNGKey(0))
    meta = model_meta(config, abstract_state)
    meta["fewstep"] = {"method": "add", "teacher_workdir": f.teacher_workdir}
    features_ref = dict(feature_net.reference)
    if config.add.features == "classifier":
        features_ref["sha256"] = params_digest(feature_net.params)
    meta["frozen"] = {"teacher": teacher_ref, "features": features_ref}
    frozen = {"teacher": teacher, "features": feature_net.params}
    frozen_sh = {k: mesh_lib.frozen_shardings(mesh, k, v, config.train) for k, v in frozen.items()}

    def init(key):  # compiled by compile_trainer for its shardings; replaced below by one taking the teacher
        return make_state(teacher, jax.random.fold_in(key, 1))

    trainer = compile_trainer(
        config,
        mesh,
        model,
        abstract_state,
        init,
        make_add_step(config, model, schedule, heads, feature_net, txs, lr_schedule, conditional),
        meta,
        step_extra_args=(frozen_sh,),
    )
    # The student starts as the teacher: built by a jitted function of the teacher's arrays, so its outputs (the
    # student, its EMA) are distinct buffers, as donation needs.
    make = jax.jit(make_state, out_shardings=trainer.state_sharding)
    trainer.init = lambda key: make(teacher, jax.random.fold_in(key, 1))
    program = trainer.step
    frozen_on_mesh = jax.device_put(frozen, frozen_sh)
    trainer.step = lambda state, batch: program(state, batch, frozen_on_mesh)
    trainer.schedule = schedule
    trainer.context["frozen"] = frozen
    trainer.context["feature_network"] = feature_net
    trainer.context["heads"] = heads
    return trainer


def make_add_sampler(config, model, steps: int, batch_size: int):
    """jitted (params, key, labels) -> SampleResult: `steps`-step ADD sampling on the trailing grid."""
    from research.sampling import schedule_from_config
    from research.shapes import model_input_shape

    schedule = schedule_from_config(config.diffusion)
    timesteps = adv.sample_timesteps(schedule.num_steps, config.add.student_timesteps, steps)
    shape = (batch_size, *model_input_shape(config))
    prediction = config.diffusion.prediction

    def run(params, key, labels):
        cond = None if labels is None else Cond(label=labels)
        fn = student_x0_fn(model, params, prediction, schedule)
        x = adv.add_sample(fn, schedule, timesteps, key, shape, cond, clip=bool(config.sample.clip_x0))
        return SampleResult(samples=x, nfe=jnp.asarray(len(timesteps), jnp.int32))

    return jax.jit(run)


__all__ = [
    "build_add_trainer",
    "make_add_sampler",
    "make_add_step",
    "student_x0_fn",
    "teacher_x0_fn",
    "validate_add",
]
