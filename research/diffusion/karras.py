"""Karras et al. (2022, "EDM") noise-level view of diffusion: preconditioning, sigma grids, ODE samplers.

In this view data are corrupted as x = x0 + sigma * n (n ~ N(0, I)), and sampling integrates the
probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM eqs. 1 and 3 with sigma(t) = t) from
sigma_max down to 0. Everything here is written against a *sigma denoiser*:

    denoise(x [B, H, W, C], sigma [B] float, cond) -> D(x; sigma), an estimate of x0 with x's shape.

That contract differs from the VP samplers' `denoise(x_t, t_model int, cond) -> model output`;
`vp_denoiser` is the one place that turns a discrete VP model into a sigma denoiser, using
x_sigma = x_t / sqrt(abar) and sigma = sqrt((1 - abar) / abar).

Sigma grids are float64 numpy arrays built on the host (they are sampling configuration, closed over
by the compiled loop); all per-example math is jax.numpy in the data dtype.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion.gaussian import _check_prediction, _check_var_type
from research.diffusion.samplers import SampleResult, split_sample_key
from research.diffusion.schedules import Schedule

# EDM's defaults (Table 1 / Sec. 5), shared by the consistency models of Song et al. (2023).
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5

SigmaDenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]
# raw_fn(scaled input [B, ...], c_noise [B], cond) -> network output F with the input's shape.
RawNetworkFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


class Preconditioning(NamedTuple):
    """Scalings of D(x; sigma) = c_skip x + c_out F(c_in x; c_noise); each has sigma's shape."""

    c_skip: jnp.ndarray
    c_out: jnp.ndarray
    c_in: jnp.ndarray
    c_noise: jnp.ndarray


# ------------------------------------------------------------------------------------ shape helpers


def batch_sigma(sigma, x) -> jnp.ndarray:
    """sigma as a [B] vector in x's dtype; a scalar is broadcast over the batch of x [B, ...]."""
    s = jnp.asarray(sigma, x.dtype)
    if s.ndim == 0:
        return jnp.full((x.shape[0],), s, x.dtype)
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or a [B]={x.shape[0]} vector, got shape {s.shape}")
    return s


def expand_sigma(sigma, x) -> jnp.ndarray:
    """[B] (or scalar) sigma reshaped to broadcast against x [B, ...]."""
    s = jnp.asarray(sigma, x.dtype)
    return s if s.ndim == 0 else s.reshape(s.shape + (1,) * (x.ndim - 1))


# --------------------------------------------------------------------------------- preconditioning


def edm_preconditioning(sigma, *, sigma_data: float = SIGMA_DATA) -> Preconditioning:
    """EDM Table 1 ("Ours"): c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
    c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4.

    Chosen (EDM App. B.6) so that for data of std sd the network input c_in x and its effective
    training target (x0 - c_skip x)/c_out both have unit variance at every sigma.
    """
    sigma = jnp.asarray(sigma)
    sd2 = sigma_data**2
    total = sigma**2 + sd2
    return Preconditioning(
        c_skip=sd2 / total,
        c_out=sigma * sigma_data * jax.lax.rsqrt(total),
        c_in=jax.lax.rsqrt(total),
        c_noise=jnp.log(sigma) / 4.0,
    )


def precondition(raw_fn: RawNetworkFn, scalings: Callable[[jnp.ndarray], Preconditioning]) -> SigmaDenoiseFn:
    """Wrap a raw network F into x -> c_skip x + c_out F(c_in x, c_noise, cond) for any scalings.

    `scalings(sigma [B]) -> Preconditioning`; F is called with c_noise as a [B] vector. A network
    whose time embedding expects DDPM-scale timesteps ([0, 1000)) wants c_noise rescaled inside
    raw_fn (the consistency-models code feeds 1000 * ln(sigma) / 4).
    """

    def denoise(x, sigma, cond=None):
        s = batch_sigma(sigma, x)
        c = scalings(s)
        out = raw_fn(expand_sigma(c.c_in, x) * x, c.c_noise, cond)
        if out.shape != x.shape:
            raise ValueError(f"network output shape {out.shape} does not match input shape {x.shape}")
        return (expand_sigma(c.c_skip, x) * x + expand_sigma(c.c_out, x) * out.astype(x.dtype)).astype(x.dtype)

    return denoise


def edm_denoiser(raw_fn: RawNetworkFn, *, sigma_data: float = SIGMA_DATA) -> SigmaDenoiseFn:
    """D(x; sigma) from a raw network with EDM's preconditioning."""
    return precondition(raw_fn, lambda s: edm_preconditioning(s, sigma_data=sigma_data))


# ------------------------------------------------------------------------------------ sigma grids


def karras_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
    """EDM eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N, sigma_N = 0.

    Returns a float64 array of length num_steps + 1, decreasing from sigma_max to sigma_min, then 0.
    With num_steps = 1 the grid is [sigma_max, 0].
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not 0.0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    n = int(num_steps)
    ramp = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    # Pin the ends: the power round trip is off by an ulp, and sigma_min is a boundary condition for
    # consistency models.
    sig[0] = sigma_max
    if n > 1:
        sig[-1] = sigma_min
    return np.concatenate([sig, [0.0]])


def check_sigmas(sigmas) -> np.ndarray:
    """Validate a sampling grid: 1-D float, length >= 2, strictly decreasing, >= 0 (only the last may be 0)."""
    try:
        sig = np.asarray(sigmas, dtype=np.float64)
    except Exception as e:  # a tracer: grids are host-side configuration
        raise ValueError("sigmas must be a concrete host array (numpy or list), not a traced value") from e
    if sig.ndim != 1 or sig.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D grid with at least 2 entries, got shape {sig.shape}")
    if not np.all(np.isfinite(sig)) or np.any(sig < 0):
        raise ValueError("sigmas must be finite and non-negative")
    if np.any(np.diff(sig) >= 0):
        raise ValueError(f"sigmas must be strictly decreasing, got {sig.tolist()}")
    return sig


# --------------------------------------------------------------------------------- ODE integration


def ode_derivative(denoise_fn: SigmaDenoiseFn, x, sigma, cond=None):
    """dx/dsigma = (x - D(x; sigma)) / sigma of the probability-flow ODE; sigma scalar or [B], > 0."""
    d = denoise_fn(x, batch_sigma(sigma, x), cond).astype(x.dtype)
    return (x - d) / expand_sigma(sigma, x)


def euler_step(denoise_fn: SigmaDenoiseFn, x, sigma, sigma_next, cond=None):
    """One Euler step of the PF-ODE from sigma to sigma_next (scalars or [B]); 1 NFE."""
    h = expand_sigma(sigma_next, x) - expand_sigma(sigma, x)
    return x + h * ode_derivative(denoise_fn, x, sigma, cond)


def heun_step(denoise_fn: SigmaDenoiseFn, x, sigma, sigma_next, cond=None):
    """One Heun (trapezoidal, 2nd order) step from sigma to sigma_next > 0 (EDM Alg. 1); 2 NFE."""
    h = expand_sigma(sigma_next, x) - expand_sigma(sigma, x)
    d = ode_derivative(denoise_fn, x, sigma, cond)
    x_euler = x + h * d
    return x + h * 0.5 * (d + ode_derivative(denoise_fn, x_euler, sigma_next, cond))


def _initial_x(sigmas, key, shape, x_init, dtype):
    if len(shape) < 1:
        raise ValueError(f"shape must be [B, ...], got {shape}")
    init_key, noise_key = split_sample_key(key)
    if x_init is None:
        return jnp.asarray(sigmas[0], dtype) * jax.random.normal(init_key, shape, dtype), noise_key
    x = jnp.asarray(x_init, dtype)
    if x.shape != tuple(shape):
        raise ValueError(f"x_init shape {x.shape} does not match shape {tuple(shape)}")
    return x, noise_key


def euler_sample(
    denoise_fn: SigmaDenoiseFn, sigmas, key, shape, *, cond=None, x_init=None, dtype=jnp.float32
) -> SampleResult:
    """Deterministic Euler over a decreasing grid `sigmas` (length L): L - 1 steps, L - 1 NFE.

    x starts at sigmas[0] * normal(init_key) (or x_init, which must already carry noise of std
    sigmas[0]). With the eps-parameterised VP denoiser on the schedule's own sigmas this is exactly
    DDIM (eta=0) in the variables x_t / sqrt(abar).
    """
    sig = check_sigmas(sigmas)
    x, _ = _initial_x(sig, key, shape, x_init, dtype)
    table = jnp.asarray(sig, dtype)

    def body(i, carry):
        x, nfe = carry
        return euler_step(denoise_fn, x, table[i], table[i + 1], cond).astype(dtype), nfe + 1

    x, nfe = jax.lax.fori_loop(0, sig.shape[0] - 1, body, (x, jnp.zeros((), jnp.int32)))
    return SampleResult(samples=x, nfe=nfe)


def heun_sample(
    denoise_fn: SigmaDenoiseFn, sigmas, key, shape, *, cond=None, x_init=None, dtype=jnp.float32
) -> SampleResult:
    """EDM Algorithm 1 with S_churn = 0: Heun steps over `sigmas`, Euler on a final step to sigma = 0.

    The correction would evaluate D at sigma = 0 where the ODE is singular, so a grid of N positive
    sigmas plus the trailing 0 costs 2N - 1 NFE; a grid without 0 (length L) costs 2(L - 1).
    """
    sig = check_sigmas(sigmas)
    x, _ = _initial_x(sig, key, shape, x_init, dtype)
    table = jnp.asarray(sig, dtype)

    def body(i, carry):
        x, nfe = carry
        s, s_next = table[i], table[i + 1]
        d = ode_derivative(denoise_fn, x, s, cond)
        x_euler = (x + (s_next - s) * d).astype(dtype)

        def correct(_):
            d2 = ode_derivative(denoise_fn, x_euler, s_next, cond)
            return (x + (s_next - s) * 0.5 * (d + d2)).astype(dtype)

        has_next = s_next > 0
        x = jax.lax.cond(has_next, correct, lambda _: x_euler, None)
        return x, nfe + 1 + has_next.astype(jnp.int32)

    x, nfe = jax.lax.fori_loop(0, sig.shape[0] - 1, body, (x, jnp.zeros((), jnp.int32)))
    return SampleResult(samples=x, nfe=nfe)


# -------------------------------------------------------------------------- discrete VP <-> sigma


def vp_sigmas(schedule: Schedule) -> np.ndarray:
    """sigma of every step of `schedule` (float64, increasing with the step index)."""
    return schedule.sqrt_recipm1_alphas_cumprod.copy()


def vp_sigma_range(schedule: Schedule) -> tuple[float, float]:
    """(sigma_min, sigma_max) a VP model was trained on: the sigmas of its first and last steps."""
    s = vp_sigmas(schedule)
    return float(s[0]), float(s[-1])


def vp_to_sigma_space(x_t, sigma):
    """x = x_t / sqrt(abar) = x_t sqrt(1 + sigma^2): turns VP's x_t into x0 + sigma eps."""
    return x_t * jnp.sqrt(1.0 + expand_sigma(sigma, x_t) ** 2)


def sigma_to_index(schedule: Schedule, sigma) -> jnp.ndarray:
    """Nearest step index of `schedule` in log(sigma) (k-diffusion's quantisation), int32 of sigma's shape.

    A binary search of the increasing table and a comparison of the two neighbours (ties go to the lower step),
    not a [..., T] distance matrix: a sigma known when the sampler is compiled (one-step consistency sampling)
    would otherwise make XLA constant-fold a [B, T] argmin on every compile.
    """
    sigma = jnp.asarray(sigma)
    dt = sigma.dtype if jnp.issubdtype(sigma.dtype, jnp.floating) else jnp.float32
    log_table = jnp.asarray(np.log(vp_sigmas(schedule)), dt)
    log_s = jnp.log(sigma.astype(dt))
    hi = jnp.clip(jnp.searchsorted(log_table, log_s), 1, log_table.shape[0] - 1)
    lower_is_nearer = log_s - log_table[hi - 1] <= log_table[hi] - log_s
    return jnp.where(lower_is_nearer, hi - 1, hi).astype(jnp.int32)


def snap_sigmas(sigmas, schedule: Schedule) -> np.ndarray:
    """Replace each positive sigma by the nearest (in log sigma) sigma of the schedule's steps.

    Keeps a trailing 0 and drops repeats, so the result may be shorter than the input: near
    sigma_min a Karras grid is finer than the VP schedule. On a snapped grid `vp_denoiser` calls
    the model exactly at its training noise levels.
    """
    sig = check_sigmas(sigmas)
    table = vp_sigmas(schedule)
    pos = sig[sig > 0]
    idx = np.abs(np.log(pos)[:, None] - np.log(table)[None, :]).argmin(axis=1)
    snapped = table[np.unique(idx)][::-1]
    return np.concatenate([snapped, [0.0]]) if sig[-1] == 0 else snapped


def vp_denoiser(
    denoise_fn,
    schedule: Schedule,
    *,
    prediction: str = "eps",
    var_type: str = "fixed_small",
    clip_x0: bool = False,
) -> SigmaDenoiseFn:
    """Turn a discrete VP model `denoise_fn(x_t, t_model [B] int32, cond) -> output` into D(x; sigma).

    The input is scaled with the requested sigma (x_t = x / sqrt(1 + sigma^2)) and the output is
    converted to x0 with that same sigma; only the timestep the model is conditioned on is
    quantised, to the step nearest in log(sigma) (`sigma_to_index`), because the model takes integer
    t. On the schedule's own sigmas (see `snap_sigmas`) this is exact. For learned_range models the
    variance channels are dropped: the ODE needs the mean only.
    """
    _check_prediction(prediction)
    _check_var_type(var_type)
    timesteps = np.asarray(schedule.timesteps, np.int32)

    def denoise(x, sigma, cond=None):
        s_b = batch_sigma(sigma, x)
        s = expand_sigma(s_b, x)
        scale = jax.lax.rsqrt(1.0 + s**2)  # sqrt(abar) at this sigma
        x_t = x * scale
        t_model = jnp.asarray(timesteps)[sigma_to_index(schedule, s_b)]
        out = denoise_fn(x_t, t_model, cond)
        if var_type == "learned_range":
            if out.shape[-1] != 2 * x.shape[-1]:
                raise ValueError(f"learned_range expects 2C={2 * x.shape[-1]} output channels, got {out.shape}")
            out = out[..., : x.shape[-1]]
        if out.shape != x.shape:
            raise ValueError(f"model output shape {out.shape} does not match x shape {x.shape}")
        out = out.astype(x.dtype)
        if prediction == "eps":
            x0 = x - s * out  # x = x0 + sigma eps in sigma space
        elif prediction == "x0":
            x0 = out
        else:
            x0 = scale * x_t - (s * scale) * out  # sqrt(abar) x_t - sqrt(1 - abar) v
        return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0

    return denoise


__all__ = [
    "Preconditioning",
    "RHO",
    "SIGMA_DATA",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "batch_sigma",
    "check_sigmas",
    "edm_denoiser",
    "edm_preconditioning",
    "euler_sample",
    "euler_step",
    "expand_sigma",
    "heun_sample",
    "heun_step",
    "karras_sigmas",
    "ode_derivative",
    "precondition",
    "sigma_to_index",
    "snap_sigmas",
    "vp_denoiser",
    "vp_sigma_range",
    "vp_sigmas",
    "vp_to_sigma_space",
]
