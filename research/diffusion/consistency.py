"""Consistency models (Song et al. 2023, "CM") and improved consistency training (Song & Dhariwal
2023, "iCT"): boundary-condition parameterisation, discretisation curricula, CD/CT losses, sampling.

Noise levels follow karras.py: x_sigma = x0 + sigma z. A *consistency function* has the sigma
denoiser signature f(x [B, ...], sigma [B], cond) -> x0 estimate, with f(x, sigma_min) = x.

The discretisation of a training step with N points is CM's ascending Karras grid (CM Sec. 4, after
EDM eq. 5, reversed and without the trailing zero):

    sigma_i = (smin^(1/rho) + i/(N-1) (smax^(1/rho) - smin^(1/rho)))^rho,   i = 0..N-1,

and a training pair is (sigma_n, sigma_{n+1}) for an index n in [0, N-2]. N changes during training
(curricula below) but the grid is computed from a traced N (`cm_sigma_at`), so a jitted train step
takes N as an int32 argument and compiles once.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion.karras import (
    RHO,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    Preconditioning,
    RawNetworkFn,
    SigmaDenoiseFn,
    batch_sigma,
    check_sigmas,
    euler_step,
    expand_sigma,
    heun_step,
    precondition,
)
from research.diffusion.samplers import SampleResult, split_sample_key, step_noise

DISTANCES = ("l2", "pseudo_huber")
CONSISTENCY_WEIGHTINGS = ("uniform", "ict")
INDEX_DISTRIBUTIONS = ("uniform", "lognormal")
SOLVERS = ("euler", "heun")

# ode_solver(teacher_denoise, x, sigma_from, sigma_to, cond) -> x at sigma_to
OdeSolver = Callable


# --------------------------------------------------------------------------------- parameterisation


def consistency_preconditioning(
    sigma, *, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN
) -> Preconditioning:
    """CM App. C: c_skip = sd^2/((s - smin)^2 + sd^2), c_out = sd (s - smin)/sqrt(sd^2 + s^2);
    c_in = 1/sqrt(s^2 + sd^2) and c_noise = ln(s)/4 as in EDM.

    At s = smin, c_skip = sd^2/sd^2 = 1 and c_out = 0 exactly in floating point, so f(x, smin) = x
    bit for bit: the boundary condition holds by construction, not by training.
    """
    sigma = jnp.asarray(sigma)
    sd2 = sigma_data**2
    gap = sigma - jnp.asarray(sigma_min, sigma.dtype)
    return Preconditioning(
        c_skip=sd2 / (gap**2 + sd2),
        c_out=sigma_data * gap * jax.lax.rsqrt(sigma**2 + sd2),
        c_in=jax.lax.rsqrt(sigma**2 + sd2),
        c_noise=jnp.log(sigma) / 4.0,
    )


def consistency_function(
    raw_fn: RawNetworkFn, *, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN
) -> SigmaDenoiseFn:
    """f(x, sigma, cond) = c_skip x + c_out F(c_in x, c_noise, cond) with CM's boundary scalings."""
    return precondition(raw_fn, lambda s: consistency_preconditioning(s, sigma_data=sigma_data, sigma_min=sigma_min))


# ------------------------------------------------------------------------------- discretisation


def cm_sigmas(num_points: int, *, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
    """The ascending N-point grid sigma_0 = smin < ... < sigma_{N-1} = smax (float64 numpy)."""
    if not isinstance(num_points, (int, np.integer)) or num_points < 2:
        raise ValueError(f"num_points must be an int >= 2, got {num_points!r}")
    i = np.arange(num_points, dtype=np.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sig = (lo + i / (num_points - 1) * (hi - lo)) ** rho
    sig[0], sig[-1] = sigma_min, sigma_max
    return sig


def cm_sigma_at(index, num_points, *, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, dtype=jnp.float32):
    """sigma_index of the N-point grid for traced `index` (any shape) and traced `num_points`.

    The ends are returned exactly (sigma_min at 0, sigma_max at N-1) rather than through the
    power round trip, so the boundary condition at sigma_0 holds bit for bit.
    """
    i = jnp.asarray(index).astype(dtype)
    n = jnp.asarray(num_points).astype(dtype)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sig = (lo + i / (n - 1) * (hi - lo)) ** rho
    sig = jnp.where(i == 0, jnp.asarray(sigma_min, dtype), sig)
    return jnp.where(i == n - 1, jnp.asarray(sigma_max, dtype), sig)


def pair_sigmas(index, num_points, **grid):
    """(sigma_n, sigma_{n+1}) for pair indices n in [0, N-2]; keywords as `cm_sigma_at`."""
    return cm_sigma_at(index, num_points, **grid), cm_sigma_at(jnp.asarray(index) + 1, num_points, **grid)


def cm_num_points(step, total_steps, *, s0: int = 2, s1: int = 150) -> int:
    """CM's CT schedule N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 (CM App. C).

    Host-side (exact float64 on python numbers). N(0) = s0 and N(K) = s1 + 1 points; CIFAR-10 CT uses
    s0 = 2, s1 = 150, mu0 = 0.9 (CM App. C, Table 3). The official code additionally floors N at 2
    (max(., 1) + 1), which only matters for s0 < 2.
    """
    _check_steps(step, total_steps)
    inner = math.sqrt(step / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2)
    return int(math.ceil(inner - 1)) + 1


def cm_ema_decay(step, total_steps, *, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> float:
    """CM's target-network EMA decay mu(k) = exp(s0 log(mu0) / N(k)) (CM App. C); mu(0) = mu0.

    This is the paper's formula. The released code (cm/script_util.py, 'adaptive' mode) divides by
    N(k) - 1 instead, i.e. mu0^(s0/(N-1)), which is mu0^2 = 0.81 rather than 0.9 at k = 0 for s0 = 2.
    """
    return float(math.exp(s0 * math.log(mu0) / cm_num_points(step, total_steps, s0=s0, s1=s1)))


def ict_num_points(step, total_steps, *, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum (iCT Sec. 3.4): N(k) = min(s0 2^floor(k/K'), s1) + 1 points,
    K' = floor(K / (log2 floor(s1/s0) + 1)), so N doubles (in intervals) every K' steps from s0 to s1.

    iCT uses no EMA for the target (mu = 0): the target network is stop_gradient(theta).
    """
    _check_steps(step, total_steps)
    k_prime = max(int(math.floor(total_steps / (math.log2(s1 // s0) + 1))), 1)
    return int(min(s0 * 2 ** (step // k_prime), s1)) + 1


def _check_steps(step, total_steps):
    if total_steps < 1 or not 0 <= step <= total_steps:
        raise ValueError(f"need 0 <= step <= total_steps with total_steps >= 1, got step={step}, total={total_steps}")


# -------------------------------------------------------------------------------- index sampling


def lognormal_index_probs(
    num_points,
    *,
    max_points: int | None = None,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    dtype=jnp.float32,
):
    """iCT Sec. 3.5: p(n) proportional to erf((ln s_{n+1} - Pm)/(sqrt2 Ps)) - erf((ln s_n - Pm)/(sqrt2 Ps)),
    i.e. the mass a lognormal(Pm, Ps) sigma puts on the interval [s_n, s_{n+1}], renormalised.

    Returns probabilities over pair indices n, shape [max_points - 1] (max_points defaults to a
    concrete num_points); entries n >= num_points - 1 are 0, so num_points may be traced.
    """
    if max_points is None:
        try:
            max_points = int(num_points)
        except Exception as e:  # a tracer has no size to build the table from
            raise ValueError("pass a static max_points when num_points is a traced value") from e
    n = jnp.arange(max_points - 1)
    grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, dtype=dtype)
    lo, hi = pair_sigmas(n, num_points, **grid)
    cdf = lambda s: jax.scipy.special.ndtr((jnp.log(s) - p_mean) / p_std)  # noqa: E731
    mass = jnp.where(n < jnp.asarray(num_points) - 1, cdf(hi) - cdf(lo), 0.0)
    return mass / jnp.sum(mass)


def sample_pair_index(
    key,
    shape,
    num_points,
    *,
    distribution: str = "uniform",
    max_points: int | None = None,
    **lognormal_kw,
):
    """Pair indices n in [0, num_points - 2], int32 of `shape`.

    'uniform' is CM's choice; 'lognormal' is iCT's (`lognormal_index_probs`, which takes
    max_points and the lognormal/grid keywords). num_points may be traced in both.
    """
    if distribution == "uniform":
        return jax.random.randint(key, shape, 0, jnp.asarray(num_points) - 1, dtype=jnp.int32)
    if distribution == "lognormal":
        p = lognormal_index_probs(num_points, max_points=max_points, **lognormal_kw)
        logits = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
        return jax.random.categorical(key, logits, shape=shape).astype(jnp.int32)
    raise ValueError(f"unknown distribution {distribution!r}; valid values: {', '.join(INDEX_DISTRIBUTIONS)}")


# ------------------------------------------------------------------------------------------ losses


def pseudo_huber_c(dim: int) -> float:
    """iCT Sec. 3.3: c = 0.00054 sqrt(d) for data of d = H*W*C values (0.03 on CIFAR-10)."""
    return 0.00054 * math.sqrt(dim)


def consistency_distance(a, b, *, distance: str = "l2", c: float | None = None):
    """Per-example distance [B] between a and b [B, ...].

    'l2': mean over non-batch dims of (a - b)^2, i.e. ||a - b||^2 / d (CM's squared L2 divided by d,
    so its scale does not depend on the image size).
    'pseudo_huber': sqrt(||a - b||^2 + c^2) - c on the un-normalised norm, c = pseudo_huber_c(d)
    unless given; computed as ||a-b||^2 / (sqrt(||a-b||^2 + c^2) + c) to avoid cancellation.
    """
    dt = jnp.promote_types(a.dtype, jnp.float32)
    diff = a.astype(dt) - b.astype(dt)
    axes = tuple(range(1, diff.ndim))
    if distance == "l2":
        return jnp.mean(jnp.square(diff), axis=axes)
    if distance == "pseudo_huber":
        if c is None:
            c = pseudo_huber_c(int(np.prod(diff.shape[1:])))
        sq = jnp.sum(jnp.square(diff), axis=axes)
        return sq / (jnp.sqrt(sq + c**2) + c)
    raise ValueError(f"unknown distance {distance!r}; valid values: {', '.join(DISTANCES)}")


def consistency_weight(sigma, sigma_next, weighting: str = "uniform"):
    """lambda(sigma_n): 'uniform' 1 (CM) or 'ict' 1/(sigma_{n+1} - sigma_n) (iCT Sec. 3.1)."""
    if weighting == "uniform":
        return jnp.ones_like(jnp.asarray(sigma))
    if weighting == "ict":
        return 1.0 / (jnp.asarray(sigma_next) - jnp.asarray(sigma))
    raise ValueError(f"unknown weighting {weighting!r}; valid values: {', '.join(CONSISTENCY_WEIGHTINGS)}")


def _solver(solver) -> OdeSolver:
    if callable(solver):
        return solver
    if solver == "euler":
        return euler_step
    if solver == "heun":
        return heun_step
    raise ValueError(f"unknown solver {solver!r}; valid values: {', '.join(SOLVERS)} or a callable")


def ct_pair(x0, noise, sigma, sigma_next):
    """CT's pair from one noise draw: (x0 + sigma_{n+1} z, x0 + sigma_n z); sigmas scalar or [B]."""
    return x0 + expand_sigma(sigma_next, x0) * noise, x0 + expand_sigma(sigma, x0) * noise


def cd_pair(
    teacher_denoise: SigmaDenoiseFn, x0, noise, sigma, sigma_next, cond=None, *, solver: str | OdeSolver = "heun"
):
    """CD's pair: x_{n+1} = x0 + sigma_{n+1} z and x_hat_n, one ODE step of the teacher from
    sigma_{n+1} down to sigma_n ('euler', 'heun' or a callable(denoise, x, s_from, s_to, cond))."""
    x_next = x0 + expand_sigma(sigma_next, x0) * noise
    x_cur = _solver(solver)(teacher_denoise, x_next, sigma_next, sigma, cond)
    return x_next, jax.lax.stop_gradient(x_cur).astype(x0.dtype)


def _pair_loss(student_fn, target_fn, x_next, x_cur, sigma, sigma_next, cond, distance, weighting, c):
    pred = student_fn(x_next, batch_sigma(sigma_next, x_next), cond)
    target = jax.lax.stop_gradient(target_fn(x_cur, batch_sigma(sigma, x_cur), cond))
    w = consistency_weight(batch_sigma(sigma, x_next), batch_sigma(sigma_next, x_next), weighting)
    return w * consistency_distance(pred, target, distance=distance, c=c)


def cd_loss(
    student_fn: SigmaDenoiseFn,
    target_fn: SigmaDenoiseFn,
    teacher_denoise: SigmaDenoiseFn,
    x0,
    noise,
    sigma,
    sigma_next,
    cond=None,
    *,
    solver: str | OdeSolver = "heun",
    distance: str = "l2",
    weighting: str = "uniform",
    c: float | None = None,
):
    """Consistency distillation (CM Def. 1 and Alg. 2), per example [B]:

        lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), f_target(x_hat_n, sigma_n)).

    student_fn closes over the trained params theta, target_fn over the EMA params theta^-
    (its output is stop-gradiented here), teacher_denoise is the pretrained D(x; sigma).
    x0, noise [B, ...]; sigma = sigma_n, sigma_next = sigma_{n+1} ([B] or scalar).
    """
    x_next, x_cur = cd_pair(teacher_denoise, x0, noise, sigma, sigma_next, cond, solver=solver)
    return _pair_loss(student_fn, target_fn, x_next, x_cur, sigma, sigma_next, cond, distance, weighting, c)


def ct_loss(
    student_fn: SigmaDenoiseFn,
    target_fn: SigmaDenoiseFn,
    x0,
    noise,
    sigma,
    sigma_next,
    cond=None,
    *,
    distance: str = "pseudo_huber",
    weighting: str = "ict",
    c: float | None = None,
):
    """Consistency training (CM Alg. 3; iCT Sec. 3), per example [B]:

        lambda(sigma_n) d(f_theta(x0 + sigma_{n+1} z, sigma_{n+1}), f_target(x0 + sigma_n z, sigma_n)).

    Defaults are iCT's (pseudo-Huber, 1/(sigma_{n+1} - sigma_n)); iCT's target_fn is the student
    itself (mu = 0), stop-gradiented here; CM's CT uses EMA params with decay `cm_ema_decay`.
    """
    x_next, x_cur = ct_pair(x0, noise, sigma, sigma_next)
    return _pair_loss(student_fn, target_fn, x_next, x_cur, sigma, sigma_next, cond, distance, weighting, c)


# ---------------------------------------------------------------------------------------- sampling


def consistency_sample(
    consistency_fn: SigmaDenoiseFn,
    sigmas,
    key,
    shape,
    *,
    sigma_min: float = SIGMA_MIN,
    cond=None,
    x_init=None,
    dtype=jnp.float32,
) -> SampleResult:
    """Multistep consistency sampling (CM Alg. 1) over decreasing `sigmas` (length L >= 1): NFE = L.

    x = f(sigmas[0] z_0, sigmas[0]); then for i >= 1: x = f(x + sqrt(sigmas[i]^2 - sigma_min^2) z_i,
    sigmas[i]). One sigma is one-step generation. x_init replaces sigmas[0] z_0; z_i for i >= 1 is
    step_noise(noise_key, i) with the samplers' key split.
    """
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if sig.shape[0] > 1:
        check_sigmas(sig)
    if sig.shape[0] < 1 or sig[-1] < sigma_min:
        raise ValueError(f"sigmas must be non-empty and >= sigma_min={sigma_min}, got {sig.tolist()}")
    if len(shape) < 1:
        raise ValueError(f"shape must be [B, ...], got {shape}")
    init_key, noise_key = split_sample_key(key)
    if x_init is None:
        x = jnp.asarray(sig[0], dtype) * jax.random.normal(init_key, shape, dtype)
    else:
        x = jnp.asarray(x_init, dtype)
        if x.shape != tuple(shape):
            raise ValueError(f"x_init shape {x.shape} does not match shape {tuple(shape)}")
    table = jnp.asarray(sig, dtype)
    # Step 0 adds no noise (its input is already at sigmas[0]); one call site keeps a single copy
    # of the network in the compiled loop.
    noise_scale = jnp.asarray(np.concatenate([[0.0], np.sqrt(sig[1:] ** 2 - sigma_min**2)]), dtype)

    def body(i, carry):
        x, nfe = carry
        x_noisy = x + noise_scale[i] * step_noise(noise_key, i, shape, dtype)
        return consistency_fn(x_noisy, batch_sigma(table[i], x_noisy), cond).astype(dtype), nfe + 1

    x, nfe = jax.lax.fori_loop(0, sig.shape[0], body, (x, jnp.zeros((), jnp.int32)))
    return SampleResult(samples=x, nfe=nfe)


__all__ = [
    "CONSISTENCY_WEIGHTINGS",
    "DISTANCES",
    "INDEX_DISTRIBUTIONS",
    "SOLVERS",
    "cd_loss",
    "cd_pair",
    "cm_ema_decay",
    "cm_num_points",
    "cm_sigma_at",
    "cm_sigmas",
    "consistency_distance",
    "consistency_function",
    "consistency_preconditioning",
    "consistency_sample",
    "consistency_weight",
    "ct_loss",
    "ct_pair",
    "ict_num_points",
    "lognormal_index_probs",
    "pair_sigmas",
    "pseudo_huber_c",
    "sample_pair_index",
]
