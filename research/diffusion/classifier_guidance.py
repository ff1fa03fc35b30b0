"""Classifier guidance (Dhariwal & Nichol 2021) over the denoiser contract, pure JAX.

A noise-aware classifier p_phi(y | x_t, t) steers an (unconditional or conditional) diffusion model towards class y
through the gradient g = grad_x log p_phi(y | x_t), taken by jax.grad inside the compiled sampling loop.

Algorithm 2 (ADM's `condition_score`, the DDIM form), what `classifier_guided_denoiser` does: the model's noise
prediction becomes the score of p(x_t) p(y | x_t)^s,

    eps' = eps - sqrt(1 - abar_t) * s * g,

and the sampler proceeds with eps' as if the model had predicted it. Because it changes only the denoiser output,
it works for every sampler (DDPM, DDIM, the DPM-Solver++ / UniPC solvers) unchanged, at one classifier forward and
backward per network evaluation. For x0 and v models the same shift is applied in eps space and mapped back
exactly (both conversions are affine in eps at fixed x_t):

    v'  = v  - sqrt(1 - abar) / sqrt(abar) * s * g,       x0' = x0 + (1 - abar) / sqrt(abar) * s * g.

Algorithm 1 (ADM's `condition_mean`, ancestral sampling): the reverse-step mean is shifted by the step's variance,
mu' = mu + s * Sigma * g; `classifier_guided_mean` is that formula and `classifier_guided_ddpm_sample` a DDPM
sampler using it (same random stream as research.diffusion.samplers.ddpm_sample). research.sampling's Generator uses
the eps-shift form for every sampler.

Labels: the requested class comes from `cond.label` ([B] int; cond is any pytree with a `label` attribute or a dict
with a 'label' key). The classifier is called at the ORIGINAL training timesteps t_model the sampler passes (ADM
conditions its classifier on them too); sqrt(1 - abar_t) is looked up by finding t_model in schedule.timesteps,
so `schedule` may be the full training schedule or the respaced one a DDPM/DDIM sampler runs on.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion.gaussian import _check_prediction, _check_var_type, extract, interpret_output, q_posterior
from research.diffusion.samplers import step_noise
from research.diffusion.sampling_common import DenoiseFn, SampleResult, split_sample_key
from research.diffusion.schedules import Schedule

# log_prob_fn(x_t [B, H, W, C], t_model [B] int32, labels [B] int32) -> log p(y | x_t) [B]
LogProbFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
# grad_log_prob(x_t, t_model, labels) -> grad_x log p(y | x_t) [B, H, W, C]
GradFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def log_prob_from_logits(logits_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]) -> LogProbFn:
    """A classifier's logits_fn(x_t, t_model) -> [B, K] as log_prob_fn: log_softmax(logits)[b, y_b] (in float32)."""

    def log_prob(x_t, t_model, labels):
        logp = jax.nn.log_softmax(logits_fn(x_t, t_model).astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]

    return log_prob


def log_prob_grad(log_prob_fn: LogProbFn) -> GradFn:
    """grad_x log p(y_b | x_b) for every example, as jax.grad of sum_b log p(y_b | x_b), taken in float32.

    The sum gives per-example gradients only when examples do not interact inside the classifier (no batch
    statistics): true of research.models.classifier.HalfUNet, whose GroupNorm and attention are per example."""

    def grad_fn(x_t, t_model, labels):
        x32 = jnp.asarray(x_t, jnp.float32)
        g = jax.grad(lambda x: jnp.sum(log_prob_fn(x, t_model, labels).astype(jnp.float32)))(x32)
        return g.astype(x_t.dtype)

    return grad_fn


def labels_of(cond) -> jnp.ndarray:
    """The requested classes [B] of a cond pytree (attribute or dict key 'label'); ValueError when absent."""
    label = cond.get("label") if isinstance(cond, dict) else getattr(cond, "label", None)
    if label is None:
        raise ValueError(
            "classifier guidance needs the requested classes: pass cond with a `label` [B] int array "
            "(e.g. research.cond.Cond(label=y)), also for an unconditional diffusion model"
        )
    return jnp.asarray(label, jnp.int32)


def _step_index(schedule: Schedule, t_model):
    """Step indices [B] of original timesteps t_model in schedule.timesteps, and a validity mask [B]."""
    timesteps = np.asarray(schedule.timesteps, np.int64)
    if not isinstance(t_model, jax.core.Tracer):
        missing = sorted(set(np.asarray(t_model).ravel().tolist()) - set(timesteps.tolist()))
        if missing:
            raise ValueError(
                f"t_model {missing[:5]} are not timesteps of the schedule given to classifier guidance; pass the "
                "training schedule or the respaced schedule the sampler runs on"
            )
    table = jnp.asarray(timesteps, jnp.int32)
    t_model = jnp.asarray(t_model).astype(jnp.int32)
    i = jnp.clip(jnp.searchsorted(table, t_model), 0, table.shape[0] - 1)
    return i, table[i] == t_model


def _is_concrete_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_scale(scale):
    if _is_concrete_number(scale) and not np.isfinite(scale):
        raise ValueError(f"classifier guidance scale must be finite, got {scale!r}")


def output_shift_coefficient(schedule: Schedule, prediction: str) -> np.ndarray:
    """c[i] with out' = out + c[i] * s * g for the model output in `prediction` form at step i (float64 [S]):
    -sqrt(1 - abar) for eps, -sqrt(1 - abar) / sqrt(abar) for v, (1 - abar) / sqrt(abar) for x0 (0 where abar = 0,
    where x_t carries no signal and a v / x0 output cannot express the shift)."""
    _check_prediction(prediction)
    sab = np.asarray(schedule.sqrt_alphas_cumprod, np.float64)
    s1m = np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64)
    if prediction == "eps":
        return -s1m
    inv = np.where(sab > 0, 1.0 / np.where(sab > 0, sab, 1.0), 0.0)
    return -s1m * inv if prediction == "v" else s1m * s1m * inv


def classifier_guided_denoiser(
    denoise_fn: DenoiseFn,
    grad_log_prob: GradFn,
    schedule: Schedule,
    scale,
    prediction: str = "eps",
) -> DenoiseFn:
    """Wrap denoise_fn(x_t, t_model, cond) so its eps becomes eps - sqrt(1 - abar_t) * scale * grad_log_prob
    (ADM's Algorithm 2), with the same contract and output parameterisation.

    denoise_fn: (x_t [B, H, W, C], t_model [B] int32 original timesteps, cond) -> [B, H, W, C or 2C]; cond is passed
        through unchanged (wrap an unconditional model as lambda x, t, c: f(x, t, None)). Channels C..2C (a learned
        variance) are returned unchanged.
    grad_log_prob: (x_t, t_model, labels [B]) -> grad_x log p(y | x_t) [B, H, W, C], e.g.
        log_prob_grad(log_prob_from_logits(classifier logits)); called on the same x_t and t_model as the model.
    schedule: the training schedule or the respaced schedule the sampler runs on (t_model is found in its
        timesteps).
    scale: s >= 0, a Python number or a traced scalar. A Python 0 returns denoise_fn itself (no gradient taken).
    prediction: 'eps', 'x0' or 'v', what the first C output channels are.
    The labels are cond.label (see `labels_of`).
    """
    coef_table = output_shift_coefficient(schedule, prediction)
    _check_scale(scale)
    if _is_concrete_number(scale) and float(scale) == 0.0:
        return denoise_fn

    def guided(x_t, t_model, cond):
        labels = labels_of(cond)
        out = denoise_fn(x_t, t_model, cond)
        channels = x_t.shape[-1]
        if out.shape[-1] not in (channels, 2 * channels) or out.shape[:-1] != x_t.shape[:-1]:
            raise ValueError(f"denoise_fn returned shape {out.shape} for x_t of shape {x_t.shape}")
        i, valid = _step_index(schedule, t_model)
        g = grad_log_prob(x_t, t_model, labels)
        coef = extract(coef_table, i, x_t.ndim, out.dtype)
        shift = coef * jnp.asarray(scale, out.dtype) * g.astype(out.dtype)
        # Inside jit an unknown timestep cannot raise: make the output NaN rather than use a neighbour's abar.
        shift = jnp.where(valid.reshape((-1,) + (1,) * (x_t.ndim - 1)), shift, jnp.nan)
        mean = out[..., :channels] + shift
        return mean if out.shape[-1] == channels else jnp.concatenate([mean, out[..., channels:]], axis=-1)

    return guided


def classifier_guided_mean(mean, log_variance, grad, scale):
    """ADM's Algorithm 1: mu + s * Sigma * g, with Sigma = exp(log_variance) (broadcast against mean)."""
    return mean + jnp.asarray(scale, mean.dtype) * jnp.exp(log_variance).astype(mean.dtype) * grad.astype(mean.dtype)


def classifier_guided_ddpm_sample(
    denoise_fn: DenoiseFn,
    grad_log_prob: GradFn,
    schedule: Schedule,
    key,
    shape,
    *,
    scale,
    cond: Any,
    prediction: str = "eps",
    var_type: str = "fixed_small",
    clip_x0: bool = True,
    x_init=None,
    dtype=jnp.float32,
) -> SampleResult:
    """Ancestral sampling with ADM's Algorithm 1: x_{t-1} = mu(x_t) + s Sigma_t g + Sigma_t^(1/2) z, g taken at x_t.

    Same random stream as samplers.ddpm_sample (x_T from the init key, step i's noise from fold_in(noise_key, i)),
    so scale=0 reproduces it. schedule is the one the chain runs on (full or respaced); labels are cond.label."""
    _check_prediction(prediction)
    _check_var_type(var_type)
    _check_scale(scale)
    labels = labels_of(cond)
    init_key, noise_key = split_sample_key(key)
    x = jax.random.normal(init_key, shape, dtype) if x_init is None else jnp.asarray(x_init, dtype)
    if x.shape != tuple(shape):
        raise ValueError(f"x_init shape {x.shape} does not match shape {tuple(shape)}")
    batch, num = shape[0], schedule.num_steps
    t_table = jnp.asarray(schedule.timesteps, jnp.int32)
    unguided = _is_concrete_number(scale) and float(scale) == 0.0

    def body(j, carry):
        x, nfe = carry
        i = num - 1 - j
        t_model = jnp.full((batch,), t_table[i], jnp.int32)
        out = denoise_fn(x, t_model, cond)
        pred = interpret_output(schedule, x, i, out, prediction=prediction, var_type=var_type, clip_x0=clip_x0)
        mean, _, _ = q_posterior(schedule, pred.x0, x, i)
        if not unguided:
            mean = classifier_guided_mean(mean, pred.log_variance, grad_log_prob(x, t_model, labels), scale)
        mask = (i != 0).astype(x.dtype)
        x_prev = mean + mask * jnp.exp(0.5 * pred.log_variance) * step_noise(noise_key, i, shape, dtype)
        return x_prev.astype(dtype), nfe + 1

    x, nfe = jax.lax.fori_loop(0, num, body, (x, jnp.zeros((), jnp.int32)))
    return SampleResult(samples=x, nfe=nfe)


__all__ = [
    "classifier_guided_ddpm_sample",
    "classifier_guided_denoiser",
    "classifier_guided_mean",
    "labels_of",
    "log_prob_from_logits",
    "log_prob_grad",
    "output_shift_coefficient",
]
