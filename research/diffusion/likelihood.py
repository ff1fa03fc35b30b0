"""Likelihood side of Improved DDPM (Nichol & Dhariwal 2021): the variational bound, L_hybrid and
importance-sampled timesteps.

Units: every bound term here is in BITS per dimension (nats / ln 2, averaged over all non-batch
dims), the unit iDDPM reports and the unit its loss weights (lambda = 0.001) were tuned in.

`t` is always a step index into the given (possibly respaced) schedule. Step 0 is the decoder
p(x_0 | x_1): its term is a discretised Gaussian NLL rather than a KL, because x_0 is data on a
256-level grid and a continuous density would make the bound unbounded.

Only numpy / jax here (no flax, no research.models), like the rest of research.diffusion.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

from research.diffusion.gaussian import (
    _check_prediction,
    _check_var_type,
    extract,
    interpret_output,
    q_posterior,
    q_sample,
    simple_loss,
)
from research.diffusion.schedules import Schedule

_LN2 = math.log(2.0)
# Half a bin of the 256-level grid on [-1, 1]: bins have width 2/255 and are centred on the levels.
_HALF_BIN = 1.0 / 255.0
# Probabilities are floored before the log so that a hopeless prediction costs log(1e-12) ~ -27.6
# nats instead of -inf (which would poison the mean and the gradient); same constant as iDDPM.
_LOG_FLOOR = 1e-12

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


def _compute_dtype(*xs):
    # At least float32 so that bfloat16 model outputs do not lose the bound to rounding.
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _mean_flat(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _batch_t(t, batch: int):
    t = jnp.asarray(t, jnp.int32)
    if t.ndim == 0:
        # A [B] vector keeps `extract` results broadcastable per example and lets jnp.where pick the
        # decoder term per example.
        return jnp.full((batch,), t, jnp.int32)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {t.shape}")
    return t


# ----------------------------------------------------------------------------------------------
# Gaussian building blocks
# ----------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting).

    Written as 0.5 * (expm1(d) - d + (mean1 - mean2)^2 / var2) with d = logvar1 - logvar2, which is
    algebraically the usual 0.5 * (-1 + logvar2 - logvar1 + exp(d) + ...). The expm1 form avoids the
    cancellation of "-1 + exp(d)" when the variances nearly match, which is exactly the regime of a
    well-trained model (KL terms of 1e-6 bits would otherwise drown in float32 rounding).
    """
    mean1, logvar1, mean2, logvar2 = (jnp.asarray(a) for a in (mean1, logvar1, mean2, logvar2))
    d = logvar1 - logvar2
    return 0.5 * (jnp.expm1(d) - d + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Tanh approximation of the standard normal CDF: 0.5 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    This is the approximation DDPM/iDDPM use (the same one as the tanh-GELU). Its absolute error is
    below ~2e-4 everywhere (tested), so likelihoods computed with it differ slightly from the exact
    ones; keep it (the default) only to reproduce published numbers, use `exact_cdf=True` otherwise.
    It is exactly point-symmetric (1 - F(x) = F(-x)), which `discretized_gaussian_log_likelihood`
    relies on.
    """
    x = jnp.asarray(x)
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def standard_normal_cdf(x):
    """Exact standard normal CDF (jax.scipy.special.ndtr)."""
    return ndtr(jnp.asarray(x))


def discretized_gaussian_log_likelihood(x, means, log_scales, *, exact_cdf: bool = False):
    """log P(x) in nats per element for data on the 256-level grid of [-1, 1] under a Gaussian
    N(means, exp(log_scales)^2) discretised to bins of width 2/255 (DDPM's decoder, eq. 13).

    Interior bins integrate [x - 1/255, x + 1/255]; the edge bins extend to -inf (x = -1) and +inf
    (x = 1) so the 256 probabilities sum to one. Probabilities are floored at 1e-12 before the log.
    `exact_cdf=False` uses the tanh CDF approximation of DDPM/iDDPM, `True` the exact ndtr.
    """
    x, means, log_scales = (jnp.asarray(a) for a in (x, means, log_scales))
    dt = _compute_dtype(x, means, log_scales)
    x, means, log_scales = x.astype(dt), means.astype(dt), log_scales.astype(dt)
    cdf = standard_normal_cdf if exact_cdf else approx_standard_normal_cdf

    centered = x - means
    inv_std = jnp.exp(-log_scales)
    plus_in = inv_std * (centered + _HALF_BIN)
    min_in = inv_std * (centered - _HALF_BIN)

    # Both CDFs satisfy 1 - F(z) = F(-z), so upper tails are evaluated as F(-z) rather than 1 - F(z):
    # above the mean the bin mass is then a difference of two small numbers instead of two numbers
    # near 1, which would cancel catastrophically in float32.
    cdf_plus = cdf(plus_in)  # mass of (-inf, x + 1/255]
    sf_min = cdf(-min_in)  # mass of [x - 1/255, inf)
    delta = jnp.where(centered > 0, sf_min - cdf(-plus_in), cdf_plus - cdf(min_in))

    def safe_log(p):
        return jnp.log(jnp.maximum(p, _LOG_FLOOR))

    # Thresholds at +-0.999 (not == +-1) tolerate data that went through float rounding.
    return jnp.where(x < -0.999, safe_log(cdf_plus), jnp.where(x > 0.999, safe_log(sf_min), safe_log(delta)))


# ----------------------------------------------------------------------------------------------
# Variational bound terms
# ----------------------------------------------------------------------------------------------


def _stop_grad_mean(output, channels: int, var_type: str):
    if var_type == "learned_range":
        mean_part, var_part = output[..., :channels], output[..., channels:]
        return jnp.concatenate([jax.lax.stop_gradient(mean_part), var_part], axis=-1)
    # With a fixed variance the whole output is the mean parameterisation.
    return jax.lax.stop_gradient(output)


def _vlb_and_prediction(schedule, x0, x_t, t, output, prediction, var_type, clip_x0, stop_grad_mean):
    _check_prediction(prediction)
    _check_var_type(var_type)
    dt = _compute_dtype(x0, x_t, output)
    x0, x_t, output = x0.astype(dt), x_t.astype(dt), output.astype(dt)
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 shape {x0.shape} does not match x_t shape {x_t.shape}")
    t = _batch_t(t, x_t.shape[0])
    if stop_grad_mean:
        output = _stop_grad_mean(output, x_t.shape[-1], var_type)

    pred = interpret_output(schedule, x_t, t, output, prediction=prediction, var_type=var_type, clip_x0=clip_x0)
    # p(x_{t-1} | x_t) = N(posterior mean at the predicted x0, model variance) (iDDPM eq. 11-13).
    model_mean, _, _ = q_posterior(schedule, pred.x0, x_t, t)
    model_log_var = jnp.broadcast_to(pred.log_variance, x_t.shape)
    true_mean, _, true_log_var = q_posterior(schedule, x0, x_t, t)

    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / _LN2
    decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / _LN2
    # Both branches are finite everywhere (log floor, clipped posterior log-variance at t=0), so the
    # unselected one contributes an exact zero to the gradient.
    return jnp.where(t == 0, decoder_nll, kl), pred


def vlb_terms(
    schedule: Schedule,
    x0,
    x_t,
    t,
    output,
    *,
    prediction: str = "eps",
    var_type: str = "learned_range",
    clip_x0: bool = False,
    stop_grad_mean: bool = False,
):
    """Per-example bound term L_t in bits/dim, shape [B].

    t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); t == 0: -log p(x0 | x_1) under the
    discretised Gaussian decoder. x0 must be data in [-1, 1] on the 256-level grid for the decoder
    term to be a proper NLL. stop_grad_mean=True freezes the mean channels (output[..., :C]) so that
    only the variance head learns from this term (L_hybrid).
    """
    vlb, _ = _vlb_and_prediction(schedule, x0, x_t, t, output, prediction, var_type, clip_x0, stop_grad_mean)
    return vlb


def prior_bpd(schedule: Schedule, x0):
    """KL(q(x_T | x0) || N(0, I)) in bits/dim, shape [B]; T is the last step of `schedule`.

    Not trainable; it is ~0 for any schedule whose alphas_cumprod[-1] is ~0.
    """
    x0 = jnp.asarray(x0)
    x0 = x0.astype(_compute_dtype(x0))
    last = schedule.num_steps - 1
    mean = extract(schedule.sqrt_alphas_cumprod, last, x0.ndim, x0.dtype) * x0
    # log(1 - abar) via log1p in float64 on the host: abar_T ~ 1e-5 would be lost in float32 1 - abar.
    log_var = jnp.asarray(np.log1p(-schedule.alphas_cumprod[last]), x0.dtype)
    return _mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / _LN2


# ----------------------------------------------------------------------------------------------
# Training losses
# ----------------------------------------------------------------------------------------------


def hybrid_loss(
    schedule: Schedule,
    x0,
    t,
    noise,
    output,
    *,
    prediction: str = "eps",
    vlb_weight: float = 0.001,
):
    """iDDPM's L_hybrid = L_simple + vlb_weight * L_vlb for a learned_range model (2C channels).

    Returns (total [B], simple [B], vlb [B]) with total = simple + vlb_weight * vlb exactly, where
      simple = gaussian.simple_loss on output[..., :C] (the mean head only),
      vlb    = S * L_t (bits/dim), the single-sample unbiased estimate of L_vlb = sum_t L_t over the
               S steps of `schedule`, computed with the mean head frozen (stop-gradient) so the VLB
               trains only the variance head output[..., C:].
    With vlb_weight = 0.001 this is exactly iDDPM's code (RESCALED_MSE: vb * num_timesteps / 1000).
    x_t is recomputed as q_sample(x0, t, noise), so pass the same noise the model input used.
    """
    x0 = jnp.asarray(x0)
    output = jnp.asarray(output)
    C = x0.shape[-1]
    if output.shape[-1] != 2 * C:
        raise ValueError(f"hybrid_loss needs a learned_range output with 2C={2 * C} channels, got shape {output.shape}")
    t = _batch_t(t, x0.shape[0])
    x_t = q_sample(schedule, x0, t, noise)
    simple = simple_loss(schedule, x0, t, noise, output[..., :C], prediction=prediction)
    vlb = schedule.num_steps * vlb_terms(
        schedule, x0, x_t, t, output, prediction=prediction, var_type="learned_range", stop_grad_mean=True
    )
    total = simple + vlb_weight * vlb
    return total, simple, vlb


def vlb_loss(
    schedule: Schedule,
    x0,
    t,
    noise,
    output,
    *,
    prediction: str = "eps",
    var_type: str = "learned_range",
    rescale: bool = True,
):
    """Pure L_vlb training loss [B] (iDDPM's `use_kl`): gradients reach the mean AND variance heads.

    rescale=True returns S * L_t, the unbiased single-sample estimate of the full bound sum_t L_t
    (iDDPM's RESCALED_KL, its `use_kl` default). rescale=False returns L_t (iDDPM's plain KL), which
    differs only by the constant factor S, i.e. an effective learning-rate change for SGD (and mostly
    irrelevant under Adam apart from epsilon). Note the num_timesteps / 1000 factor in iDDPM's code
    belongs to the hybrid loss, and is reproduced there by vlb_weight = 0.001 times S.
    Combine with importance sampling as mean(weights * vlb_loss(...)).
    """
    x0 = jnp.asarray(x0)
    t = _batch_t(t, x0.shape[0])
    x_t = q_sample(schedule, x0, t, noise)
    vlb = vlb_terms(schedule, x0, x_t, t, output, prediction=prediction, var_type=var_type)
    return schedule.num_steps * vlb if rescale else vlb


# ----------------------------------------------------------------------------------------------
# Importance sampling of t (iDDPM Sec. 3.3)
# ----------------------------------------------------------------------------------------------

# iDDPM's official LossSecondMomentResampler mixes in uniform_prob = 0.001 of total probability
# mass spread uniformly (p = 0.999 * p_imp + 0.001 / T), so no step is starved and 1/p stays
# bounded by 1000 T.
DEFAULT_UNIFORM_PROB = 1e-3


class ImportanceState(NamedTuple):
    """Pytree state of the loss-aware timestep sampler.

    history: [T, H] float32 ring buffers of the last H losses per step.
    counts:  [T] int32. min(counts, H) slots of a row are valid and the next write goes to slot
             counts % H. Once a row is full, counts is kept in [H, 2H) (not incremented forever) so it
             cannot overflow yet still encodes the ring position.
    """

    history: jnp.ndarray
    counts: jnp.ndarray


def importance_init(num_steps: int, history: int = 10) -> ImportanceState:
    """Empty sampler state for a schedule with `num_steps` steps (the paper keeps 10 losses per t)."""
    if num_steps < 1 or history < 1:
        raise ValueError(f"num_steps and history must be positive, got {num_steps}, {history}")
    return ImportanceState(
        history=jnp.zeros((num_steps, history), jnp.float32),
        counts=jnp.zeros((num_steps,), jnp.int32),
    )


def importance_warm(state: ImportanceState):
    """Bool scalar: every step has a full history, so importance sampling is active."""
    return jnp.all(state.counts >= state.history.shape[1])


def importance_probs(state: ImportanceState, *, uniform_prob: float = DEFAULT_UNIFORM_PROB):
    """Sampling probabilities p [T] float32 and whether they are the importance ones (bool scalar).

    Warm: p_t = (1 - uniform_prob) * sqrt(E[L_t^2]) / sum_s sqrt(E[L_s^2]) + uniform_prob / T.
    Not warm (or all-zero history): uniform 1/T, as in the paper.
    """
    history = state.history.astype(jnp.float32)
    T = history.shape[0]
    rms = jnp.sqrt(jnp.mean(jnp.square(history), axis=-1))
    total = jnp.sum(rms)
    use = importance_warm(state) & (total > 0) & jnp.isfinite(total)
    p_imp = rms / jnp.where(use, total, 1.0)
    p = (1.0 - uniform_prob) * p_imp + uniform_prob / T
    return jnp.where(use, p, jnp.full((T,), 1.0 / T, jnp.float32)), use


def importance_sample(state: ImportanceState, key, batch: int, *, uniform_prob: float = DEFAULT_UNIFORM_PROB):
    """Draw t [batch] int32 from `importance_probs` and weights [batch] float32 = 1 / (T p_t).

    Weighting each example's loss by w makes mean(w * L_t) an unbiased estimate of the uniform-t mean
    of L_t. While not warm, t is uniform and the weights are exactly 1.
    """
    p, use = importance_probs(state, uniform_prob=uniform_prob)
    T = p.shape[0]
    t = jax.random.categorical(key, jnp.log(p), shape=(batch,)).astype(jnp.int32)
    weights = jnp.where(use, 1.0 / (T * p[t]), 1.0).astype(jnp.float32)
    return t, weights


def importance_update(state: ImportanceState, t, losses) -> ImportanceState:
    """Push per-example losses into the per-step ring buffers; jit-compatible, t must be in [0, T).

    Duplicates within a batch are applied as if one at a time in batch order (as iDDPM's Python loop
    does): the j-th occurrence of a step goes to slot (counts + j) % H, and if a step occurs more
    than H times only its last H losses are written. Kept writes therefore hit distinct slots and the
    scatter is deterministic. The row's contents equal iDDPM's shift-register history as a multiset
    (order within a row is irrelevant to the second moment).
    """
    history, counts = state
    T, H = history.shape
    t = jnp.asarray(t, jnp.int32).reshape(-1)
    losses = jnp.asarray(losses, jnp.float32).reshape(-1)
    if t.shape != losses.shape:
        raise ValueError(f"t and losses must have the same number of elements, got {t.shape}, {losses.shape}")
    B = t.shape[0]

    # Sort by step (stable keeps batch order among duplicates) to get each element's occurrence rank.
    order = jnp.argsort(t, stable=True)
    ts, ls = t[order], losses[order]
    pos = jnp.arange(B, dtype=jnp.int32)
    first = jnp.searchsorted(ts, ts, side="left").astype(jnp.int32)
    last_excl = jnp.searchsorted(ts, ts, side="right").astype(jnp.int32)
    rank = pos - first
    later = last_excl - 1 - pos  # occurrences of the same step after this one
    slot = (counts[ts] + rank) % H
    # Writes that would be overwritten later in the same batch are routed out of bounds and dropped.
    row = jnp.where(later < H, ts, T)
    history = history.at[row, slot].set(ls, mode="drop")

    total = counts + jnp.zeros((T,), jnp.int32).at[t].add(1)
    counts = jnp.where(total >= H, H + total % H, total).astype(jnp.int32)
    return ImportanceState(history=history, counts=counts)


# ----------------------------------------------------------------------------------------------
# Full bound
# ----------------------------------------------------------------------------------------------


def bits_per_dim(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    x0,
    key,
    *,
    prediction: str,
    var_type: str,
    clip_x0: bool = False,
    cond=None,
):
    """The full variational bound of x0 [B, H, W, C] (data in [-1, 1]) in bits/dim.

    Evaluates every one of the S steps of `schedule` in one `jax.lax.scan` (jit the call, with
    denoise_fn and schedule closed over, to get one compiled program). Step i uses noise
    normal(fold_in(key, i)) and calls denoise_fn(x_t, schedule.timesteps[i], cond), the samplers'
    contract. Returns
      total    [B]    sum_i vlb_terms[:, i] + prior
      prior    [B]    prior_bpd
      vlb_terms[B, S] L_i, column i = step index i (iDDPM stores them reversed; we do not)
      mse      [B, S] mean squared error of the predicted eps (iDDPM's "mse" diagnostic)
      x0_mse   [B, S] mean squared error of the predicted x0
      nfe      int32  number of denoise_fn calls (S)
    A respaced schedule gives the bound of the respaced (shorter) chain, which is looser.
    """
    _check_prediction(prediction)
    _check_var_type(var_type)
    x0 = jnp.asarray(x0)
    x0 = x0.astype(_compute_dtype(x0))
    B = x0.shape[0]
    t_model_table = jnp.asarray(schedule.timesteps, jnp.int32)

    def body(nfe, i):
        t = jnp.full((B,), i, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape, x0.dtype)
        x_t = q_sample(schedule, x0, t, noise)
        out = denoise_fn(x_t, t_model_table[t], cond)
        vlb, pred = _vlb_and_prediction(schedule, x0, x_t, t, out, prediction, var_type, clip_x0, False)
        mse = _mean_flat(jnp.square(pred.eps - noise))
        x0_mse = _mean_flat(jnp.square(pred.x0 - x0))
        return nfe + 1, (vlb, mse, x0_mse)

    steps = jnp.arange(schedule.num_steps, dtype=jnp.int32)
    nfe, (vlb, mse, x0_mse) = jax.lax.scan(body, jnp.zeros((), jnp.int32), steps)
    prior = prior_bpd(schedule, x0)
    vlb, mse, x0_mse = vlb.T, mse.T, x0_mse.T
    return {
        "total": jnp.sum(vlb, axis=1) + prior,
        "prior": prior,
        "vlb_terms": vlb,
        "mse": mse,
        "x0_mse": x0_mse,
        "nfe": nfe,
    }


__all__ = [
    "DEFAULT_UNIFORM_PROB",
    "ImportanceState",
    "approx_standard_normal_cdf",
    "bits_per_dim",
    "discretized_gaussian_log_likelihood",
    "hybrid_loss",
    "importance_init",
    "importance_probs",
    "importance_sample",
    "importance_update",
    "importance_warm",
    "normal_kl",
    "prior_bpd",
    "standard_normal_cdf",
    "vlb_loss",
    "vlb_terms",
]
