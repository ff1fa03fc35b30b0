"""Train state, optimizer and EMA."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps taken
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array           # raw uint32 [2] key; step k uses fold_in(rng, k), so resuming needs no RNG replay
    t_sampler: Any = None    # loss-history buffer for importance-sampled t (diffusion.t_sampling='importance')


def learning_rate_schedule(optim_config, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps (DDPM), then constant or cosine decay to 0."""
    lr, warmup = optim_config.lr, int(optim_config.warmup_steps)
    if optim_config.lr_schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(num_steps, warmup + 1), 0.0)


def make_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(optim_config, num_steps)
    # identity() keeps the chain's state structure when clipping is off, so grad_clip can change on resume.
    parts = [optax.clip_by_global_norm(optim_config.grad_clip) if optim_config.grad_clip > 0 else optax.identity()]
    if optim_config.optimizer == "adam":
        parts.append(optax.adam(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps))
    else:
        parts.append(optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                                 weight_decay=optim_config.weight_decay))
    return optax.chain(*parts)


def init_train_state(params, tx: optax.GradientTransformation, seed: int, t_sampler=None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed), t_sampler=t_sampler)


def ema_update(ema_params, params, decay: float):
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p, ema_params, params)
