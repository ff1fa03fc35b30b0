"""The jitted training step: sample t and noise, run the model, the configured loss, optimizer and EMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research.diffusion import gaussian, likelihood
from research.train.state import TrainState, ema_update


def make_loss_fn(model, schedule, diffusion_config, *, conditional: bool):
    """loss(params, batch, rng, t_sampler_state) -> (scalar loss, aux dict with per-example terms).

    diffusion.loss:
      simple  Ho et al.'s L_simple: unweighted MSE on the eps / x0 / v target.
      hybrid  iDDPM's L_simple + vlb_weight * L_vlb; L_vlb sees the mean stop-gradiented, so it trains only
              the variance head of a learned_range model.
      vlb     L_vlb alone (iDDPM's rescaled KL), optionally with importance-sampled t.
    """
    prediction, loss_kind = diffusion_config.prediction, diffusion_config.loss
    var_type, vlb_weight = diffusion_config.var_type, diffusion_config.vlb_weight
    importance = diffusion_config.t_sampling == "importance"
    num_steps = schedule.num_steps

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
        labels = batch["label"] if conditional else None
        t_model = jnp.asarray(schedule.timesteps, jnp.int32)[t]
        output = model.apply({"params": params}, x_t, t_model, labels, train=True, rngs={"dropout": dropout_rng})
        aux = {}
        if loss_kind == "simple":
            per_example = gaussian.simple_loss(schedule, x0, t, noise, output[..., :channels], prediction)
        elif loss_kind == "hybrid":
            per_example, simple, vlb = likelihood.hybrid_loss(schedule, x0, t, noise, output, prediction=prediction,
                                                              vlb_weight=vlb_weight)
            aux = {"loss_simple": simple.mean(), "vlb_bpd_per_step": vlb.mean() / num_steps}
        else:
            per_example = likelihood.vlb_loss(schedule, x0, t, noise, output, prediction=prediction,
                                              var_type=var_type)
        return jnp.mean(weights * per_example), {"per_example": per_example, "t": t, **aux}

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
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng,
                                                                       state.t_sampler)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        t_sampler = state.t_sampler
        if t_sampler is not None:
            # The history holds unweighted losses: the sampling probabilities estimate E[L_t^2] per t.
            t_sampler = likelihood.importance_update(t_sampler, aux["t"], jax.lax.stop_gradient(aux["per_example"]))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, t_sampler=t_sampler,
                                  ema_params=ema_update(state.ema_params, params,
                                                        ema_decay_at(state.step, ema_decay, ema_warmup)))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step),
                   **{k: v for k, v in aux.items() if k not in ("per_example", "t")}}
        return new_state, metrics

    return train_step
