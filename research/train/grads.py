"""How a training step computes its gradients: microbatch accumulation and float16 dynamic loss scaling.

Gradient accumulation (train.grad_accum = k) splits the global batch into k microbatches and sums their gradients
inside one compiled step (lax.scan), so a batch that does not fit in memory trains as if it did: the optimizer
sees the mean gradient of the whole batch, and the activations of only one microbatch are alive at a time.
Microbatch i takes the rows i, i + k, i + 2k, ... of the batch. The batch is sharded over 'data' in contiguous
blocks, so with a per-device batch divisible by k every device holds its own rows of every microbatch and no
data moves between devices. Microbatch i draws its noise from fold_in(rng, i); k = 1 uses the step's key
unchanged, so runs without accumulation keep their random streams.

Dynamic loss scaling (model.dtype='float16', or train.loss_scale='dynamic'): float16 gradients underflow, so the
loss is multiplied by a scale S before differentiation and the gradients divided by S after. A step whose
gradients are not all finite is skipped (parameters, optimizer state and EMA keep their values; the step counter
still advances, so checkpoints and schedules stay aligned) and S is halved; after `period` finite steps in a row S
is doubled. The scale lives in TrainState.loss_scale and is checkpointed with the rest.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp

INITIAL_LOSS_SCALE = 2.0**15
LOSS_SCALE_PERIOD = 2000


@flax.struct.dataclass
class LossScale:
    scale: jax.Array  # float32 scalar S
    good_steps: jax.Array  # int32: finite steps since S last changed
    period: int = flax.struct.field(pytree_node=False, default=LOSS_SCALE_PERIOD)
    factor: float = flax.struct.field(pytree_node=False, default=2.0)

    def adjust(self, finite) -> "LossScale":
        """The scale after a step whose gradients were (not) all finite."""
        grown = self.good_steps + 1 >= self.period
        scale = jnp.where(
            finite,
            jnp.where(grown, self.scale * self.factor, self.scale),
            jnp.maximum(self.scale / self.factor, 1.0),
        )
        good = jnp.where(finite & ~grown, self.good_steps + 1, 0)
        return self.replace(scale=scale.astype(jnp.float32), good_steps=good.astype(jnp.int32))


def init_loss_scale(initial: float = INITIAL_LOSS_SCALE, period: int = LOSS_SCALE_PERIOD) -> LossScale:
    return LossScale(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32), period=int(period))


def uses_loss_scale(config) -> bool:
    """Whether a run scales its loss: train.loss_scale 'dynamic', or 'auto' (the default) with float16 compute."""
    mode = config.train.get("loss_scale", "auto")
    return mode == "dynamic" or (mode == "auto" and config.model.get("dtype", "float32") == "float16")


def loss_scale_for(config) -> Optional[LossScale]:
    """The initial LossScale of a run, or None when it does not scale its loss."""
    return init_loss_scale() if uses_loss_scale(config) else None


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _split(batch, k: int):
    """[B, ...] -> [k, B // k, ...] with microbatch i = rows i, i + k, ... (see the module docstring)."""

    def split(x):
        if not hasattr(x, "shape") or x.ndim == 0:
            raise ValueError("gradient accumulation splits every batch field along its first axis")
        if x.shape[0] % k:
            raise ValueError(f"train.grad_accum={k} does not divide the batch's {x.shape[0]} rows")
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _merge(stacked, k: int):
    """Undo _split for per-example outputs [k, m, ...] -> [k * m, ...] in batch order; scalars [k] are averaged."""

    def merge(x):
        if x.ndim == 1:
            return jnp.mean(x, axis=0)
        return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])

    return jax.tree.map(merge, stacked)


def value_and_grad(
    loss_fn: Callable,
    params,
    batch,
    rng,
    *args,
    microbatches: int = 1,
    loss_scale: Optional[LossScale] = None,
):
    """((loss, aux), grads) of loss_fn(params, batch, rng, *args) -> (scalar mean loss, aux).

    With microbatches = k > 1 the loss and gradients are the means over k microbatches of the batch (equal to the
    whole batch's for a loss that is a mean over examples); aux leaves must be scalars (averaged) or per-example
    arrays (put back in batch order). With a loss_scale the gradients of S * loss are taken and divided by S (not
    checked for finiteness here: apply_gradients(finite=...) does the skipping). `args` are passed unchanged."""
    scale = None if loss_scale is None else loss_scale.scale

    def scaled(p, b, key):
        loss, aux = loss_fn(p, b, key, *args)
        return (loss if scale is None else loss * scale.astype(loss.dtype)), (loss, aux)

    grad_fn = jax.value_and_grad(scaled, has_aux=True)
    if microbatches == 1:
        (_, (loss, aux)), grads = grad_fn(params, batch, rng)
    else:
        micro = _split(batch, microbatches)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)

        def body(acc, inputs):
            i, mb = inputs
            (_, out), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, g), out

        total, stacked = jax.lax.scan(body, zeros, (jnp.arange(microbatches), micro))
        grads = jax.tree.map(lambda t, p: (t / microbatches).astype(p.dtype), total, params)
        loss, aux = _merge(stacked, microbatches)
    if scale is not None:
        grads = jax.tree.map(lambda g: (g / scale).astype(g.dtype), grads)
    return (loss, aux), grads


def scale_metrics(state) -> dict:
    """The loss scale as a logged metric (empty for a run without one)."""
    return {} if state.loss_scale is None else {"loss_scale": state.loss_scale.scale}


def keep_if(finite, new: Any, old: Any):
    """new where finite (a traced bool), old otherwise, leaf by leaf."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
