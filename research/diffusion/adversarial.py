"""Adversarial diffusion distillation (Sauer et al. 2023, "ADD"): the math, independent of networks and training.

The student is a denoiser run at a few fixed timesteps (`add_timesteps`); from noised real data x_s it predicts
x0_theta. Its loss is

    L_G = adversarial_weight * (-D(x0_theta, c)) + lambda * c(t) ||x0_theta - sg(x0_teacher(x0_theta renoised to t))||^2

where the distillation target re-noises the student's output at a random teacher timestep t and reads the frozen
teacher's x0 prediction there (`distillation_loss`), and the discriminator D is trained with the hinge loss plus
an R1 penalty on real data (`hinge_discriminator_loss`, `r1_penalty`). D's logits come per head and per token
(one head per feature layer of a frozen network, a logit per spatial position); every loss here averages them.

Sampling (`add_sample`) runs the student at k of its timesteps: predict x0, re-noise it to the next timestep with
fresh noise, and return the last x0 (as SD-Turbo samples, 1 to 4 steps, no guidance).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion import gaussian
from research.diffusion.schedules import Schedule

WEIGHTINGS = ("alpha", "alpha_bar", "uniform")


def add_timesteps(num_timesteps: int, k: int) -> np.ndarray:
    """k evenly spaced timesteps from the last one down ("trailing"): T=1000, k=4 -> [999, 749, 499, 249]."""
    k, num_timesteps = int(k), int(num_timesteps)
    if not 1 <= k <= num_timesteps:
        raise ValueError(f"need 1 <= k <= T for k student timesteps, got k={k}, T={num_timesteps}")
    return np.asarray([num_timesteps - 1 - (i * num_timesteps) // k for i in range(k)], np.int32)


def sample_timesteps(num_timesteps: int, k: int, sample_steps: int) -> np.ndarray:
    """The `sample_steps` timesteps a student trained on add_timesteps(T, k) samples with: the trailing grid of
    sample_steps points. For k=4: 1 step [999], 2 steps [999, 499], 4 steps [999, 749, 499, 249]; each is a
    subset of the training grid whenever sample_steps divides k."""
    if not 1 <= int(sample_steps) <= int(k):
        raise ValueError(f"a student trained at {k} timesteps samples with 1..{k} steps, got {sample_steps}")
    return add_timesteps(num_timesteps, sample_steps)


def x0_from_output(schedule: Schedule, x_t, t, output, prediction: str):
    """The x0 a network output stands for (eps, x0 or v parameterisation), unclipped."""
    return gaussian.interpret_output(schedule, x_t, t, output, prediction=prediction).x0


def distillation_weight(schedule: Schedule, t, weighting: str) -> jax.Array:
    """c(t) [B]: 'alpha' = sqrt(alpha_bar_t) (ADD's exponential weighting: the signal scale alpha_t of
    x_t = alpha_t x0 + sigma_t eps), 'alpha_bar' = alpha_bar_t, 'uniform' = 1."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; choose one of {list(WEIGHTINGS)}")
    t = jnp.asarray(t)
    if weighting == "uniform":
        return jnp.ones(t.shape, jnp.float32)
    alpha_bar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t]
    return jnp.sqrt(alpha_bar) if weighting == "alpha" else alpha_bar


def distillation_loss(
    schedule: Schedule,
    teacher_x0: Callable,
    student_x0,
    key,
    cond=None,
    *,
    weighting: str = "alpha",
    t_range: Sequence[int] = (1, None),
):
    """ADD's distillation term, per example [B]: c(t) mean((x0_theta - sg(x0_teacher))^2).

    teacher_x0(x_t, t [B], cond) -> x0 the frozen teacher predicts (guided or not); student_x0 [B, ...] is
    re-noised at t ~ U{t_range[0], ..., t_range[1] - 1} (default 1..T-1) with fresh noise. The gradient reaches the
    student only through the first argument of the squared difference (the teacher's input is stopped too, as the
    target is a function of a detached copy)."""
    lo, hi = t_range
    hi = schedule.num_steps if hi is None else hi
    t_key, noise_key = jax.random.split(key)
    b = student_x0.shape[0]
    t = jax.random.randint(t_key, (b,), lo, hi)
    noise = jax.random.normal(noise_key, student_x0.shape, student_x0.dtype)
    detached = jax.lax.stop_gradient(student_x0)
    x_t = gaussian.q_sample(schedule, detached, t, noise)
    target = jax.lax.stop_gradient(teacher_x0(x_t, t, cond))
    err = jnp.mean(jnp.square(student_x0 - target), axis=tuple(range(1, student_x0.ndim)))
    return distillation_weight(schedule, t, weighting) * err


def _mean_over_heads(fn, logits: Sequence[jax.Array]) -> jax.Array:
    return sum(jnp.mean(fn(h)) for h in logits) / len(logits)


def hinge_discriminator_loss(real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array]) -> jax.Array:
    """mean relu(1 - D(real)) + mean relu(1 + D(fake)), averaged over heads (each head's logits [B, N])."""
    return _mean_over_heads(lambda h: jax.nn.relu(1.0 - h), real_logits) + _mean_over_heads(
        lambda h: jax.nn.relu(1.0 + h), fake_logits
    )


def generator_adversarial_loss(fake_logits: Sequence[jax.Array]) -> jax.Array:
    """-mean D(fake), averaged over heads."""
    return -_mean_over_heads(lambda h: h, fake_logits)


def discriminator_accuracy(real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array]) -> jax.Array:
    """The fraction of (head, token) logits on the right side of 0: real > 0, fake < 0, averaged over both."""
    real = _mean_over_heads(lambda h: (h > 0).astype(jnp.float32), real_logits)
    fake = _mean_over_heads(lambda h: (h < 0).astype(jnp.float32), fake_logits)
    return 0.5 * (real + fake)


def example_scores(logits: Sequence[jax.Array]) -> jax.Array:
    """[B] one score per example: the sum over heads of each head's mean logit over its tokens."""
    return sum(jnp.mean(h.reshape(h.shape[0], -1), axis=1) for h in logits)


def r1_penalty(score_fn: Callable, x_real) -> jax.Array:
    """R1 (Mescheder et al. 2018) without its gamma / 2: mean over the batch of ||d score(x)_b / d x_b||^2, where
    score_fn(x [B, ...]) -> [B] treats examples independently (then one backward pass gives every gradient)."""
    grads = jax.grad(lambda x: jnp.sum(score_fn(x)))(x_real)
    return jnp.mean(jnp.sum(jnp.square(grads).reshape(grads.shape[0], -1), axis=1))


def add_sample(student_x0: Callable, schedule: Schedule, timesteps, key, shape, cond=None, *, clip: bool = True):
    """k-step sampling: x = noise; for each timestep t_i: x0 = student_x0(x, t_i, cond), and unless last,
    x = q_sample(x0, t_{i+1}, fresh noise). Returns the last x0 (clipped to [-1, 1] with clip)."""
    timesteps = [int(t) for t in np.asarray(timesteps).reshape(-1)]
    keys = jax.random.split(key, len(timesteps))
    x = jax.random.normal(keys[0], shape, jnp.float32)
    b = shape[0]
    x0 = x
    for i, t in enumerate(timesteps):
        x0 = student_x0(x, jnp.full((b,), t, jnp.int32), cond)
        if i + 1 < len(timesteps):
            noise = jax.random.normal(keys[i + 1], shape, jnp.float32)
            x = gaussian.q_sample(schedule, x0, jnp.full((b,), timesteps[i + 1], jnp.int32), noise)
    return jnp.clip(x0, -1.0, 1.0) if clip else x0


__all__ = [
    "WEIGHTINGS",
    "add_sample",
    "add_timesteps",
    "discriminator_accuracy",
    "distillation_loss",
    "distillation_weight",
    "example_scores",
    "generator_adversarial_loss",
    "hinge_discriminator_loss",
    "r1_penalty",
    "sample_timesteps",
    "x0_from_output",
]
