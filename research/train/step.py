"""The jitted training step: sample t and noise, run the model, simple loss, optimizer and EMA update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research.diffusion import gaussian
from research.train.state import TrainState, ema_update


def make_loss_fn(model, schedule, diffusion_config, *, conditional: bool):
    """loss(params, batch, rng) -> (scalar loss, per-example loss [B]); the simple loss of DDPM.

    With prediction='eps' this is Ho et al.'s L_simple; 'x0' and 'v' regress the corresponding target with
    the same unweighted MSE.
    """
    prediction = diffusion_config.prediction
    num_steps = schedule.num_steps

    def loss_fn(params, batch, rng):
        x0 = batch["image"]
        t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        t = jax.random.randint(t_rng, (x0.shape[0],), 0, num_steps)
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        x_t = gaussian.q_sample(schedule, x0, t, noise)
        labels = batch["label"] if conditional else None
        t_model = jnp.asarray(schedule.timesteps, jnp.int32)[t]
        output = model.apply({"params": params}, x_t, t_model, labels, train=True, rngs={"dropout": dropout_rng})
        per_example = gaussian.simple_loss(schedule, x0, t, noise, output[..., : x0.shape[-1]], prediction)
        return per_example.mean(), per_example

    return loss_fn


def ema_decay_at(step, ema_decay: float, warmup: bool):
    """Constant decay (DDPM), or with warmup min(decay, (1 + k) / (10 + k)) so a short run's EMA is not
    dominated by its initialisation."""
    if not warmup:
        return jnp.asarray(ema_decay, jnp.float32)
    k = step.astype(jnp.float32)
    return jnp.minimum(ema_decay, (1.0 + k) / (10.0 + k))


def make_train_step(loss_fn, tx: optax.GradientTransformation, lr_schedule, ema_decay: float,
                    ema_warmup: bool = False):
    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_update(state.ema_params, params,
                                                        ema_decay_at(state.step, ema_decay, ema_warmup)))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step)}
        return new_state, metrics

    return train_step
