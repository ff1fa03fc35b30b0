"""task='noisy_classifier': ADM's noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021).

Objective, per batch of B labelled images x0 [B, H, W, C], y [B]: t ~ U{0, ..., T-1}, x_t = q_sample(x0, t, eps),
L = mean_b CE(classifier(x_t, timesteps[t]), y_b). The run's diffusion section gives the schedule, so it must equal
the schedule of the diffusion model the classifier will guide (configs/classifier_mnist.py matches configs/
quickstart.py and configs/cfg_mnist.py: cosine, T=1000). One part, 'net' (model.name='half_unet'), with an EMA.
Metrics: loss, accuracy (on the noisy batch), grad_norm, lr.

Use: `python -m research.sample --workdir DIFFUSION_RUN --classifier CLASSIFIER_RUN --classifier-scale S` (see
research.diffusion.classifier_guidance); a classifier run has no sampler of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research.config import ConfigError
from research.diffusion import gaussian
from research.sampling import schedule_from_config
from research.shapes import abstract_net_params, build_network, init_net_params
from research.tasks import Task, Trainer, register_task
from research.tasks.common import compile_trainer, model_meta, validate_network
from research.train.state import apply_gradients, ema_decay_at, init_train_state, learning_rate_schedule, make_optimizer


def make_classifier_loss_fn(model, schedule):
    """loss(params, batch, rng) -> (mean cross-entropy, accuracy) on x_t at uniform random step indices."""
    num_steps = schedule.num_steps
    t_table = jnp.asarray(schedule.timesteps, jnp.int32)

    def loss_fn(params, batch, rng):
        x0, labels = batch["image"], batch["label"].astype(jnp.int32)
        t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        t = jax.random.randint(t_rng, (x0.shape[0],), 0, num_steps)
        x_t = gaussian.q_sample(schedule, x0, t, jax.random.normal(noise_rng, x0.shape, x0.dtype))
        logits = model.apply({"params": params}, x_t, t_table[t], None, train=True, rngs={"dropout": dropout_rng})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        return loss, accuracy

    return loss_fn


def make_classifier_step(loss_fn, txs, lr_schedule, ema_decay: float, ema_warmup: bool = False):
    def train_step(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["net"], batch, rng)
        new_state = apply_gradients(state, {"net": grads}, txs, ema_decay_at(state.step, ema_decay, ema_warmup))
        metrics = {
            "loss": loss,
            "accuracy": accuracy,
            "grad_norm": optax.global_norm(grads),
            "lr": lr_schedule(state.step),
        }
        return new_state, metrics

    return train_step


@register_task("noisy_classifier")
class NoisyClassifierTask(Task):
    def validate(self, config) -> None:
        if config.model.name != "half_unet":
            raise ConfigError(
                f"task='noisy_classifier' trains model 'half_unet' (see configs/classifier_mnist.py), not "
                f"model.name={config.model.name!r}"
            )
        if config.latent.autoencoder:
            raise ConfigError(
                "task='noisy_classifier' classifies noisy pixels; latent classifiers are not supported "
                "(set latent.autoencoder='')"
            )
        k, data_k = int(config.model.get("num_classes", 0)), int(config.data.num_classes)
        if k < 1 or k != data_k:
            raise ConfigError(
                f"model.num_classes={k} and data.num_classes={data_k}: a classifier needs both equal and > 0"
            )
        if config.model.get("pool", "attention") not in ("attention", "mean"):
            raise ConfigError(f"model.pool={config.model.pool!r} is not valid; choose one of ['attention', 'mean']")
        validate_network(config)

    def build_trainer(self, config, mesh) -> Trainer:
        tc = config.train
        model = build_network(config)
        schedule = schedule_from_config(config.diffusion)
        txs = {"net": make_optimizer(config.optim, tc.num_steps)}
        lr_schedule = learning_rate_schedule(config.optim, tc.num_steps)
        step_fn = make_classifier_step(
            make_classifier_loss_fn(model, schedule), txs, lr_schedule, tc.ema_decay, tc.ema_warmup
        )

        def init(key):
            return init_train_state({"net": init_net_params(model, config, key)}, txs, config.seed)

        abstract = jax.eval_shape(
            lambda p: init_train_state({"net": p}, txs, config.seed), abstract_net_params(model, config)
        )
        trainer = compile_trainer(config, mesh, model, abstract, init, step_fn, model_meta(config, abstract))
        trainer.schedule = schedule
        return trainer

    has_sampler = False  # the override below only explains why

    def sampler(self, workdir, config, options=None):
        raise ConfigError(
            f"{workdir} holds a noisy classifier, which has no sampler; use it to guide a diffusion run with "
            f"python -m research.sample --workdir DIFFUSION_RUN --classifier {workdir} --classifier-scale S"
        )
