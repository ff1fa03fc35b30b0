"""One train state with named parts, the optimizers, and the optimizer + EMA update written once.

Every task trains one or more named parts: 'net' (a diffusion network, an autoencoder, a few-step student),
'disc' (a discriminator), 'image' + 'text' (CLIP towers). The state holds, per part, its parameters and its optax
state, and an EMA copy for the parts that keep one. Parts that are not trained (a teacher, an autoencoder under a
latent diffusion run) are not in the state at all: the trainer holds them as `frozen` and records where they came
from (run path, step, sha256) in the checkpoint metadata, so checkpoints do not copy them.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Dict[str, Any]  # part -> parameters being trained
    ema_params: Dict[str, Any]  # part -> EMA of its parameters (only the parts that keep one)
    opt_state: Dict[str, Any]  # part -> optax state
    rng: jax.Array  # raw uint32 [2] key; step k uses fold_in(rng, k), so resuming needs no RNG replay
    extra: Any = None  # task-owned arrays that are not parameters (importance-sampling history, PD's
    # round teacher, a consistency target network), checkpointed with the rest
    loss_scale: Any = None  # research.train.grads.LossScale of a float16 run (dynamic loss scaling), else None

    def sampling_params(self, part: str = "net", use_ema: bool = True):
        if use_ema and part in self.ema_params:
            return self.ema_params[part]
        return self.params[part]


def init_train_state(
    params: Mapping[str, Any],
    txs: Mapping[str, optax.GradientTransformation],
    seed: int,
    *,
    ema_parts=("net",),
    extra=None,
    loss_scale=None,
) -> TrainState:
    params = dict(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params={p: params[p] for p in ema_parts if p in params},
        opt_state={p: txs[p].init(v) for p, v in params.items()},
        rng=jax.random.PRNGKey(seed),
        extra=extra,
        loss_scale=loss_scale,
    )


def learning_rate_schedule(optim_config, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps (DDPM), then constant, cosine decay to 0, or linear decay to 0
    at num_steps (ADM's anneal_lr)."""
    lr, warmup = optim_config.lr, int(optim_config.warmup_steps)
    if optim_config.lr_schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if optim_config.lr_schedule == "linear":
        decay = optax.linear_schedule(lr, 0.0, max(num_steps - warmup, 1))
        if warmup == 0:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(num_steps, warmup + 1), 0.0)


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(optim_config, num_steps)
    # identity() keeps the chain's state structure when clipping is off, so grad_clip can change on resume.
    parts = [optax.clip_by_global_norm(optim_config.grad_clip) if optim_config.grad_clip > 0 else optax.identity()]
    if optim_config.optimizer == "adam":
        parts.append(optax.adam(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps))
    else:
        parts.append(
            optax.adamw(
                schedule,
                b1=optim_config.b1,
                b2=optim_config.b2,
                eps=optim_config.eps,
                weight_decay=optim_config.weight_decay,
                # CLIP (and open_clip) decay weight matrices and embeddings only: no gains, biases or scalars.
                mask=_matrices if optim_config.get("decay_matrices_only", False) else None,
            )
        )
    return optax.chain(*parts)


def ema_update(ema_params, params, decay):
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p, ema_params, params)


def ema_decay_at(step, ema_decay: float, warmup: bool):
    """Constant decay (DDPM), or with warmup min(decay, (1 + k) / (10 + k)) so a short run's EMA is not
    dominated by its initialisation."""
    if not warmup:
        return jnp.asarray(ema_decay, jnp.float32)
    k = jnp.asarray(step).astype(jnp.float32)
    return jnp.minimum(ema_decay, (1.0 + k) / (10.0 + k))


def apply_gradients(
    state: TrainState,
    grads: Mapping[str, Any],
    txs: Mapping[str, optax.GradientTransformation],
    ema_decay,
    *,
    step_increment: bool = True,
    extra: Optional[Any] = None,
    keep_extra: bool = True,
) -> TrainState:
    """One optimizer step for every part in `grads` (the others keep their parameters and optimizer state), then
    the EMA of every part that keeps one, with `ema_decay` (a float or a traced scalar).

    A state with a loss scale (float16 training, research.train.grads) takes the step only when every gradient is
    finite: otherwise parameters, optimizer state, EMA and `extra` keep their values, the step counter advances
    and the scale is halved."""
    params, opt_state = dict(state.params), dict(state.opt_state)
    for part, g in grads.items():
        updates, opt_state[part] = txs[part].update(g, state.opt_state[part], state.params[part])
        params[part] = optax.apply_updates(state.params[part], updates)
    ema = {part: ema_update(e, params[part], ema_decay) for part, e in state.ema_params.items()}
    new_extra = state.extra if keep_extra else extra
    loss_scale = state.loss_scale
    if loss_scale is not None:
        from research.train.grads import all_finite, keep_if

        finite = all_finite(grads)
        old = (state.params, state.opt_state, state.ema_params)
        params, opt_state, ema = keep_if(finite, (params, opt_state, ema), old)
        if jax.tree.structure(new_extra) == jax.tree.structure(state.extra):
            new_extra = keep_if(finite, new_extra, state.extra)
        loss_scale = loss_scale.adjust(finite)
    return state.replace(
        step=state.step + 1 if step_increment else state.step,
        params=params,
        opt_state=opt_state,
        ema_params=ema,
        extra=new_extra,
        loss_scale=loss_scale,
    )
