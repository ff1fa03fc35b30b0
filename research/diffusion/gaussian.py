"""Gaussian diffusion math over arrays: forward process, posteriors, and output parameterisations.

Arrays are [B, H, W, C] (any [B, ...] works). `t` is always a *step index* into the given (possibly
respaced) schedule, either a scalar or [B] ints; models, by contrast, are conditioned on
`schedule.timesteps[t]`. Coefficients are combined in float64 on the host and cast to the data
dtype only when gathered, so float32 runs lose no precision on products such as sqrt(1/abar - 1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from research.diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")


class ModelPrediction(NamedTuple):
    """x0 and eps have the shape of x_t; log_variance broadcasts against x_t."""

    x0: jnp.ndarray
    eps: jnp.ndarray
    log_variance: jnp.ndarray


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid values: {', '.join(PREDICTIONS)}")


def _check_var_type(var_type: str) -> None:
    if var_type not in VAR_TYPES:
        raise ValueError(f"unknown var_type {var_type!r}; valid values: {', '.join(VAR_TYPES)}")


def extract(arr_np: np.ndarray, t, ndim: int, dtype=jnp.float32) -> jnp.ndarray:
    """Gather arr_np[t] as `dtype`, shaped to broadcast against a rank-`ndim` [B, ...] array.

    t may be a scalar (result is a scalar) or a [B] integer array (result is [B, 1, ..., 1]).
    """
    coeff = jnp.asarray(np.asarray(arr_np), dtype=dtype)[jnp.asarray(t)]
    if coeff.ndim == 0:
        return coeff
    if coeff.ndim != 1:
        raise ValueError(f"t must be a scalar or a [B] vector, got shape {jnp.shape(t)}")
    return coeff.reshape(coeff.shape + (1,) * (ndim - 1))


def _c(arr_np, t, x) -> jnp.ndarray:
    return extract(arr_np, t, x.ndim, x.dtype)


def q_sample(schedule: Schedule, x0, t, noise):
    """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given noise."""
    return _c(schedule.sqrt_alphas_cumprod, t, x0) * x0 + _c(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior(schedule: Schedule, x0, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
    mean = _c(schedule.posterior_mean_coef1, t, x_t) * x0 + _c(schedule.posterior_mean_coef2, t, x_t) * x_t
    var = _c(schedule.posterior_variance, t, x_t)
    log_var = _c(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, var, log_var


def predict_x0_from_eps(schedule: Schedule, x_t, t, eps):
    return _c(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _c(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def predict_eps_from_x0(schedule: Schedule, x_t, t, x0):
    # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar), with both ratios formed in float64.
    inv_sigma = 1.0 / schedule.sqrt_one_minus_alphas_cumprod
    return _c(inv_sigma, t, x_t) * x_t - _c(schedule.sqrt_alphas_cumprod * inv_sigma, t, x_t) * x0


def predict_v(schedule: Schedule, x0, t, eps):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    return _c(schedule.sqrt_alphas_cumprod, t, x0) * eps - _c(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def predict_x0_from_v(schedule: Schedule, x_t, t, v):
    return _c(schedule.sqrt_alphas_cumprod, t, x_t) * x_t - _c(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v


def predict_eps_from_v(schedule: Schedule, x_t, t, v):
    return _c(schedule.sqrt_alphas_cumprod, t, x_t) * v + _c(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t


def interpret_output(
    schedule: Schedule,
    x_t,
    t,
    output,
    *,
    prediction: str = "eps",
    var_type: str = "fixed_small",
    clip_x0: bool = False,
) -> ModelPrediction:
    """Turn a raw model output into (x0, eps, log_variance) for step index t.

    For var_type='learned_range' the output carries 2C channels on the last axis: the first C are
    the mean parameterisation, the last C a value v in [-1, 1] that interpolates the log-variance
    between the posterior variance (v=-1) and beta_t (v=1), as in iDDPM.
    With clip_x0, eps is recomputed from the clipped x0 so that every sampler built from (x0, eps)
    sees one consistent pair.
    """
    _check_prediction(prediction)
    _check_var_type(var_type)

    if var_type == "learned_range":
        if output.shape[-1] != 2 * x_t.shape[-1]:
            raise ValueError(
                f"learned_range expects 2C={2 * x_t.shape[-1]} output channels on the last axis, "
                f"got output shape {output.shape} for x_t shape {x_t.shape}"
            )
        output, var_out = jnp.split(output, 2, axis=-1)
        min_log = _c(schedule.posterior_log_variance_clipped, t, x_t)
        max_log = _c(np.log(schedule.betas), t, x_t)
        frac = (var_out + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
    elif var_type == "fixed_small":
        log_variance = _c(schedule.posterior_log_variance_clipped, t, x_t)
    else:
        log_variance = _c(schedule.fixed_large_log_variance, t, x_t)

    if output.shape != x_t.shape:
        raise ValueError(f"model output shape {output.shape} does not match x_t shape {x_t.shape}")

    if prediction == "eps":
        eps = output
        x0 = predict_x0_from_eps(schedule, x_t, t, eps)
    elif prediction == "x0":
        x0 = output
        eps = predict_eps_from_x0(schedule, x_t, t, x0)
    else:
        x0 = predict_x0_from_v(schedule, x_t, t, output)
        eps = predict_eps_from_v(schedule, x_t, t, output)

    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = predict_eps_from_x0(schedule, x_t, t, x0)
    return ModelPrediction(x0=x0, eps=eps, log_variance=log_variance)


def training_target(schedule: Schedule, x0, t, noise, prediction: str):
    """Regression target for the model output given the clean x0 and the noise used in q_sample."""
    _check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return predict_v(schedule, x0, t, noise)


def simple_loss(schedule: Schedule, x0, t, noise, output, prediction: str = "eps"):
    """Per-example "L_simple": mean over non-batch dims of (output - target)^2, shape [B].

    For learned_range models pass only the first C output channels; the variance channels are
    trained by a separate VLB term, not by this loss.
    """
    target = training_target(schedule, x0, t, noise, prediction)
    if output.shape != target.shape:
        raise ValueError(
            f"output shape {output.shape} != target shape {target.shape}; "
            "for learned_range models pass only the first C channels (output[..., :C])"
        )
    # Accumulate in at least float32 so bfloat16 outputs do not lose the loss to rounding.
    dt = jnp.promote_types(output.dtype, jnp.float32)
    err = jnp.square(output.astype(dt) - target.astype(dt))
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))
