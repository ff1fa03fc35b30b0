"""Fast deterministic ODE solvers for discrete VP diffusion: DPM-Solver++ (Lu et al. 2022) multistep orders 1-3
("2M", "3M") and singlestep order 2 ("2S"), and UniPC (Zhao et al. 2023) with its UniC corrector.

All of them integrate the probability-flow ODE in the data-prediction form over a grid of noise levels, step
orders and warm-up/lower-order-final rules as diffusers' DPMSolverMultistepScheduler,
DPMSolverSinglestepScheduler and UniPCMultistepScheduler (defaults, final_sigmas_type='zero').

Design: for a fixed grid every update is a *linear* combination of the current sample, one saved sample (the
singlestep anchor / UniPC's pre-corrector sample) and the last few x0 predictions, with weights that depend only
on the grid. `solver_plan` computes those weights once on the host in float64 numpy (including UniPC's small
linear solves), and the compiled loop (`lax.scan`, one denoiser call per step) just gathers one row per step and
forms the sums in the data dtype. Every step therefore runs the same program, whatever its order.

Noise levels: the state at grid point i is x = alpha_i x0 + sigma_i eps with sigma_ve,i = sigma_i / alpha_i
(`SolverGrid.sigmas`), alpha_i = 1 / sqrt(1 + sigma_ve,i^2), lambda_i = -log(sigma_ve,i). The model is always
called at an integer ORIGINAL training timestep (`SolverGrid.timesteps`); on the Karras and log-SNR grids the
sigmas lie between training steps and, as in diffusers, the model gets the timestep found by interpolating
log(sigma) over the schedule's steps and rounding, while the update uses the exact sigma.

Denoiser contract (as samplers.py): `denoise_fn(x_t [B, H, W, C], t_model [B] int32, cond) -> output` with output
eps, x0 or v (`prediction`); learned-variance models may append C channels, which are ignored.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion.gaussian import _check_prediction, _check_var_type
from research.diffusion.sampling_common import DenoiseFn, SampleResult, split_sample_key
from research.diffusion.schedules import Schedule

SOLVER_GRIDS = ("uniform", "logsnr", "karras")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
SOLVER_METHODS = ("dpmpp_multistep", "dpmpp_singlestep", "unipc")
DPM_SOLVER_TYPES = ("midpoint", "heun")
UNIPC_SOLVER_TYPES = ("bh1", "bh2")


# ------------------------------------------------------------------------------------------------ grids


class SolverGrid(NamedTuple):
    """N solver steps: the model is called at timesteps[k] (original training timesteps, int64 [N]) and step k
    moves from sigmas[k] to sigmas[k + 1] (VE noise levels sqrt((1 - abar) / abar), float64 [N + 1], decreasing,
    sigmas[N] = 0)."""

    timesteps: np.ndarray
    sigmas: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def _schedule_sigmas(schedule: Schedule) -> np.ndarray:
    acp = schedule.alphas_cumprod
    return np.sqrt((1.0 - acp) / acp)


def _sigma_to_index(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """Fractional step index of each sigma by linear interpolation of log(sigma) between neighbouring steps
    (diffusers' _sigma_to_t), clamped to the table's range."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, log_table.shape[0] - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def solver_grid(schedule: Schedule, steps: int | None = None, grid: str = "uniform", *, spacing: str = "linspace"):
    """The N-step grid of `schedule` (its step indices; a full training schedule gives diffusers' grids).

    grid='uniform': timesteps spaced as diffusers' timestep_spacing `spacing` ('linspace', the default of the
    DPM-Solver and UniPC schedulers; 'leading'; 'trailing'), sigmas those of the chosen steps. steps=None takes
    every step of the schedule (e.g. a respaced schedule as is).
    grid='logsnr': sigmas uniform in log-SNR between the schedule's first and last step (diffusers'
    use_lu_lambdas). grid='karras': EDM's rho=7 spacing between the same ends (use_karras_sigmas). Both need
    `steps` (default: the schedule's step count) and call the model at the rounded interpolated timestep.
    Difference from diffusers: its DPMSolverMultistepScheduler truncates instead of rounding those timesteps for
    the 'squaredcos_cap_v2' schedule; here they are always rounded.
    """
    S = schedule.num_steps
    if grid not in SOLVER_GRIDS:
        raise ValueError(f"unknown solver grid {grid!r}; valid values: {', '.join(SOLVER_GRIDS)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer))):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    if steps is not None and not 1 <= steps <= S:
        raise ValueError(f"steps must be in [1, {S}] for this {S}-step schedule, got {steps}")
    table = _schedule_sigmas(schedule)

    if grid == "uniform":
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; valid values: {', '.join(TIMESTEP_SPACINGS)}")
        if steps is None:
            idx = np.arange(S, dtype=np.int64)[::-1]
        else:
            n = int(steps)
            if spacing == "linspace":
                idx = np.linspace(0, S - 1, n + 1).round()[::-1][:-1].astype(np.int64)
            elif spacing == "leading":
                idx = (np.arange(n + 1) * (S // (n + 1)))[::-1][:-1].astype(np.int64)
            else:
                idx = np.arange(S, 0, -S / n).round().astype(np.int64) - 1
            if idx.shape[0] != n or (n > 1 and not np.all(np.diff(idx) < 0)) or idx[-1] < 0:
                raise ValueError(
                    f"{n} steps with spacing {spacing!r} repeat timesteps of this {S}-step schedule; use fewer steps"
                )
        return SolverGrid(
            timesteps=np.asarray(schedule.timesteps[idx], np.int64),
            sigmas=np.concatenate([table[idx], [0.0]]),
        )

    if S < 2:
        raise ValueError(f"grid {grid!r} interpolates between schedule steps and needs at least 2 of them")
    n = S if steps is None else int(steps)
    ramp = np.linspace(0.0, 1.0, n)
    if grid == "karras":
        # EDM eq. 5 with rho = 7 (karras.karras_sigmas; not imported: karras builds on samplers, which imports us).
        lo, hi = table[0] ** (1.0 / 7.0), table[-1] ** (1.0 / 7.0)
        sig = (hi + ramp * (lo - hi)) ** 7.0
    else:
        log_hi, log_lo = np.log(table[-1]), np.log(table[0])
        sig = np.exp(log_hi + ramp * (log_lo - log_hi))
    frac = _sigma_to_index(sig, np.log(table))
    t = np.interp(frac, np.arange(S), schedule.timesteps.astype(np.float64))
    return SolverGrid(timesteps=np.round(t).astype(np.int64), sigmas=np.concatenate([sig, [0.0]]))


def _as_grid(schedule, steps, grid, spacing) -> SolverGrid:
    if isinstance(grid, SolverGrid):
        if steps is not None and steps != grid.num_steps:
            raise ValueError(f"steps={steps} disagrees with the given SolverGrid's {grid.num_steps} steps")
        ts, sig = np.asarray(grid.timesteps, np.int64), np.asarray(grid.sigmas, np.float64)
        if ts.ndim != 1 or sig.shape != (ts.shape[0] + 1,) or ts.shape[0] < 1:
            raise ValueError(f"SolverGrid needs timesteps [N] and sigmas [N+1], got {ts.shape} and {sig.shape}")
        if not (np.all(np.diff(sig) < 0) and sig[-1] == 0.0):
            raise ValueError("SolverGrid sigmas must be strictly decreasing and end at 0")
        return SolverGrid(ts, sig)
    if not isinstance(grid, str):
        raise ValueError(f"grid must be one of {', '.join(SOLVER_GRIDS)} or a SolverGrid, got {grid!r}")
    return solver_grid(schedule, steps, grid, spacing=spacing)


# -------------------------------------------------------------------------------------- plan (host side)


@dataclasses.dataclass(frozen=True, eq=False)
class SolverPlan:
    """Everything static about one solve; built by `solver_plan`, closed over by the compiled loop.

    Step k: m = x0 prediction (`in_coef[k]` . (x, output), then thresholding/clipping);
    if `corrector` is not None, x <- corrector[k] . (x, anchor, m, hist_0..hist_{K-1});
    anchor <- x where reset_anchor[k]; x <- update[k] . (anchor, m, hist_0..hist_{K-1}); hist <- (m, hist[:-1]).
    hist_j is the x0 prediction of step k-1-j. All tables are float64.
    """

    method: str
    grid: SolverGrid
    orders: np.ndarray  # [N] int: order of the (predictor) update of each step
    in_coef: np.ndarray  # [N, 2]
    corrector: np.ndarray | None  # [N, 3 + K]
    update: np.ndarray  # [N, 2 + K]
    reset_anchor: np.ndarray  # [N] bool
    history: int  # K
    prediction: str
    thresholding: bool
    dynamic_thresholding_ratio: float
    sample_max_value: float
    clip_x0: bool
    var_type: str | None

    @property
    def num_steps(self) -> int:
        return self.grid.num_steps


def _vp(sigmas):
    with np.errstate(divide="ignore"):
        alpha = 1.0 / np.sqrt(1.0 + sigmas**2)
        return alpha, sigmas * alpha, -np.log(sigmas)  # lambda = +inf at sigma = 0


def _unipc_rhos(h, rks, order, solver_type, corrector):
    """UniPC's B(h) and the rho weights of its difference terms (Zhao et al. 2023, Alg. 2/3, data prediction)."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    h_phi_k, fact, b = h_phi_1 / hh - 1.0, 1.0, []
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R = np.stack([np.asarray(rks) ** (i - 1) for i in range(1, order + 1)])
    b = np.asarray(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    else:
        rhos = np.zeros(0) if order == 1 else np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
    return h_phi_1, b_h, rhos


def _multistep_orders(n, order, lower_order_final):
    orders = []
    for k in range(n):
        # The last step always drops to first order: it lands on sigma = 0, where lambda is infinite.
        if order == 1 or k == 0 or k == n - 1:
            orders.append(1)
        elif order == 2 or k == 1 or (lower_order_final and n < 15 and k == n - 2):
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _singlestep_orders(n, order):
    # diffusers forces lower_order_final when the final sigma is 0: order-2 pairs (1, 2), ending in 1s.
    if order == 1:
        return [1] * n
    orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    orders[-1] = 1
    return orders


def solver_plan(
    schedule: Schedule,
    method: str,
    *,
    steps: int | None = None,
    order: int = 2,
    grid="uniform",
    spacing: str = "linspace",
    prediction: str = "eps",
    solver_type: str | None = None,
    lower_order_final: bool = True,
    disable_corrector=(),
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    clip_x0: bool = False,
    var_type: str | None = None,
) -> SolverPlan:
    """Host-side float64 weight tables for `method` in SOLVER_METHODS on `grid` (a name or a SolverGrid).

    dpmpp_multistep: order 1-3, solver_type 'midpoint' (default) or 'heun' (order 2 only; order 3 has one form).
    dpmpp_singlestep: order 1-2, same solver types. unipc: order 1-3, solver_type 'bh2' (default) or 'bh1';
    disable_corrector lists step indices after which UniC is skipped (diffusers' semantics).
    Every method takes the last step (onto sigma = 0) at first order, whatever lower_order_final says.
    """
    if method not in SOLVER_METHODS:
        raise ValueError(f"unknown solver method {method!r}; valid values: {', '.join(SOLVER_METHODS)}")
    _check_prediction(prediction)
    if var_type is not None:
        _check_var_type(var_type)
    max_order = 2 if method == "dpmpp_singlestep" else 3
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= max_order:
        raise ValueError(f"{method} supports order 1..{max_order}, got {order!r}")
    types = UNIPC_SOLVER_TYPES if method == "unipc" else DPM_SOLVER_TYPES
    if solver_type is None:
        solver_type = "bh2" if method == "unipc" else "midpoint"
    if solver_type not in types:
        raise ValueError(f"unknown solver_type {solver_type!r} for {method}; valid values: {', '.join(types)}")
    if not 0.0 < dynamic_thresholding_ratio <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio}")
    if sample_max_value < 1.0:
        raise ValueError(f"sample_max_value must be >= 1 (thresholds are never below 1), got {sample_max_value}")

    g = _as_grid(schedule, steps, grid, spacing)
    n = g.num_steps
    alpha, sig, lam = _vp(g.sigmas)
    order = int(order)

    if method == "dpmpp_multistep":
        orders, K = _multistep_orders(n, order, lower_order_final), order - 1
    elif method == "dpmpp_singlestep":
        orders, K = _singlestep_orders(n, order), order - 1
    else:
        orders, K = [min(order, n - k if lower_order_final else order, k + 1) for k in range(n)], order
        # The last step lands on sigma = 0 (lambda = inf), where higher orders divide by zero; diffusers returns NaN
        # there with lower_order_final=False.
        orders[-1] = 1

    # Basis of the update rows: (anchor, m, hist_0, ...); of the corrector rows: (x, anchor, m, hist_0, ...).
    def e(j, size):
        v = np.zeros(size)
        v[j] = 1.0
        return v

    U = 2 + K
    A, M = e(0, U), e(1, U)

    def H(j):
        return e(2 + j, U)

    update = np.zeros((n, U))
    corrector = np.zeros((n, U + 1)) if method == "unipc" else None
    reset = np.ones(n, bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(n):
            p = orders[k]
            if method == "unipc":
                h = lam[k + 1] - lam[k]
                rks = [(lam[k - i] - lam[k]) / h for i in range(1, p)] + [1.0]
                h_phi_1, b_h, rhos = _unipc_rhos(h, rks, p, solver_type, corrector=False)
                w = sig[k + 1] / sig[k] * A - alpha[k + 1] * h_phi_1 * M
                for i in range(1, p):
                    w = w - alpha[k + 1] * b_h * rhos[i - 1] * (H(i - 1) - M) / rks[i - 1]
                update[k] = w
                if k > 0 and (k - 1) not in tuple(disable_corrector):
                    pc = orders[k - 1]
                    h = lam[k] - lam[k - 1]
                    rks = [(lam[k - 1 - i] - lam[k - 1]) / h for i in range(1, pc)] + [1.0]
                    h_phi_1, b_h, rhos = _unipc_rhos(h, rks, pc, solver_type, corrector=True)
                    # Corrector basis = (x, anchor, m, hist...): update basis shifted by one.
                    a_, m_, h0 = e(1, U + 1), e(2, U + 1), e(3, U + 1)
                    res = rhos[-1] * (m_ - h0)
                    for i in range(1, pc):
                        res = res + rhos[i - 1] * (e(3 + i, U + 1) - h0) / rks[i - 1]
                    corrector[k] = sig[k] / sig[k - 1] * a_ - alpha[k] * h_phi_1 * h0 - alpha[k] * b_h * res
                else:
                    corrector[k] = e(0, U + 1)
                continue

            # DPM-Solver++ in data-prediction form; phi = e^{-h} - 1.
            s = k - 1 if (method == "dpmpp_singlestep" and p == 2) else k
            reset[k] = method == "dpmpp_multistep" or p == 1
            h = lam[k + 1] - lam[s]
            phi = np.exp(-h) - 1.0
            a = alpha[k + 1]
            w = sig[k + 1] / sig[s] * A
            if p == 1:
                w = w - a * phi * M
            elif p == 2:
                if method == "dpmpp_multistep":
                    r0, d0, d1 = (lam[k] - lam[k - 1]) / h, M, M - H(0)
                else:  # singlestep: from the anchor at k-1 through the intermediate point k
                    r0, d0, d1 = (lam[k] - lam[k - 1]) / h, H(0), M - H(0)
                c1 = -0.5 * a * phi if solver_type == "midpoint" else a * (phi / h + 1.0)
                w = w - a * phi * d0 + c1 * d1 / r0
            else:
                r0, r1 = (lam[k] - lam[k - 1]) / h, (lam[k - 1] - lam[k - 2]) / h
                d1_0, d1_1 = (M - H(0)) / r0, (H(0) - H(1)) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                w = w - a * phi * M + a * (phi / h + 1.0) * d1 - a * ((phi + h) / h**2 - 0.5) * d2
            update[k] = w

    if not (np.all(np.isfinite(update)) and (corrector is None or np.all(np.isfinite(corrector)))):
        raise ValueError("solver weights are not finite: grid sigmas must be positive and distinct before the final 0")

    a0, s0, _ = _vp(g.sigmas[:-1])
    if prediction == "eps":
        in_coef = np.stack([1.0 / a0, -s0 / a0], 1)
    elif prediction == "v":
        in_coef = np.stack([a0, -s0], 1)
    else:
        in_coef = np.stack([np.zeros(n), np.ones(n)], 1)

    return SolverPlan(
        method=method,
        grid=g,
        orders=np.asarray(orders, np.int64),
        in_coef=in_coef,
        corrector=corrector,
        update=update,
        reset_anchor=reset,
        history=K,
        prediction=prediction,
        thresholding=bool(thresholding),
        dynamic_thresholding_ratio=float(dynamic_thresholding_ratio),
        sample_max_value=float(sample_max_value),
        clip_x0=bool(clip_x0),
        var_type=var_type,
    )


# -------------------------------------------------------------------------------------- step (traced side)


class SolverState(NamedTuple):
    """x: current sample [B, H, W, C]; anchor: saved sample (singlestep start / UniPC pre-corrector sample);
    history: x0 predictions of the previous K steps, newest first, each [B, H, W, C]."""

    x: jnp.ndarray
    anchor: jnp.ndarray
    history: tuple


def solver_init(plan: SolverPlan, x) -> SolverState:
    """State before step 0 for x_T = x [B, H, W, C] (history slots are zeros and weighted by exactly 0)."""
    x = jnp.asarray(x)
    return SolverState(x=x, anchor=x, history=tuple(jnp.zeros_like(x) for _ in range(plan.history)))


def dynamic_threshold(x0, ratio: float = 0.995, max_value: float = 1.0):
    """Imagen's dynamic thresholding as diffusers applies it: per example s = quantile(|x0|, ratio) over all
    non-batch entries, clamped to [1, max_value]; x0 -> clip(x0, -s, s) / s. x0: [B, H, W, C]."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value).astype(x0.dtype)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def _combine(weights: np.ndarray, k, vectors):
    """sum_j weights[k, j] * vectors[j], skipping columns that are zero on every step."""
    out = None
    table = None
    for j, v in enumerate(vectors):
        if not np.any(weights[:, j]):
            continue
        if table is None:
            table = jnp.asarray(weights, vectors[0].dtype)[k]
        term = table[j] * v
        out = term if out is None else out + term
    return jnp.zeros_like(vectors[0]) if out is None else out


def solver_step(plan: SolverPlan, state: SolverState, k, output) -> SolverState:
    """Step k (int or traced int32 scalar) of `plan` given the model output at state.x and timestep
    plan.grid.timesteps[k]; output is [B, H, W, C] or [B, H, W, 2C] (learned-variance channels dropped)."""
    x = state.x
    C = x.shape[-1]
    if plan.var_type == "learned_range" and output.shape[-1] != 2 * C:
        raise ValueError(f"var_type='learned_range' needs 2C={2 * C} output channels, got output shape {output.shape}")
    if output.shape[-1] == 2 * C:
        output = output[..., :C]
    if output.shape != x.shape:
        raise ValueError(f"model output shape {output.shape} does not match x shape {x.shape}")
    output = output.astype(x.dtype)

    if plan.prediction == "x0":
        m = output
    else:
        coef = jnp.asarray(plan.in_coef, x.dtype)[k]
        m = coef[0] * x + coef[1] * output
    if plan.thresholding:
        m = dynamic_threshold(m, plan.dynamic_thresholding_ratio, plan.sample_max_value)
    if plan.clip_x0:
        m = jnp.clip(m, -1.0, 1.0)

    hist = tuple(state.history)
    anchor = state.anchor
    if plan.corrector is not None:
        x = _combine(plan.corrector, k, (x, anchor, m) + hist)
    if np.all(plan.reset_anchor):
        anchor = x
    elif np.any(plan.reset_anchor):
        anchor = jnp.where(jnp.asarray(plan.reset_anchor)[k], x, anchor)
    x_next = _combine(plan.update, k, (anchor, m) + hist)
    hist = ((m,) + hist[:-1]) if hist else ()
    return SolverState(x=x_next.astype(state.x.dtype), anchor=anchor.astype(state.x.dtype), history=hist)


def solve(plan: SolverPlan, denoise_fn: DenoiseFn, key, shape, *, cond=None, x_init=None, dtype=jnp.float32):
    """Run `plan` from x_T = normal(init_key) (the samplers' key split, so DDIM and these solvers share x_T for
    one key) or x_init [B, H, W, C] (then `key` is unused and may be None); one denoiser call per step inside one
    lax.scan. -> SampleResult."""
    if len(shape) < 1:
        raise ValueError(f"shape must be [B, ...], got {shape}")
    if x_init is None:
        x = jax.random.normal(split_sample_key(key)[0], shape, dtype)
    else:
        x = jnp.asarray(x_init, dtype)
        if x.shape != tuple(shape):
            raise ValueError(f"x_init shape {x.shape} does not match shape {tuple(shape)}")
    batch = shape[0]
    t_table = jnp.asarray(plan.grid.timesteps, jnp.int32)

    def body(carry, k):
        state, nfe = carry
        t_model = jnp.full((batch,), t_table[k], jnp.int32)
        out = denoise_fn(state.x, t_model, cond)
        return (solver_step(plan, state, k, out), nfe + 1), None

    init = (solver_init(plan, x), jnp.zeros((), jnp.int32))
    (state, nfe), _ = jax.lax.scan(body, init, jnp.arange(plan.num_steps, dtype=jnp.int32))
    return SampleResult(samples=state.x, nfe=nfe)


# ------------------------------------------------------------------------------------------- entry points

_PLAN_DOC = """
    steps: number of model calls (None: every step of `schedule`, for grid='uniform'); grid: 'uniform' (with
    `spacing` 'linspace' | 'leading' | 'trailing'), 'logsnr', 'karras' or a SolverGrid (see `solver_grid`).
    prediction: what the model outputs ('eps', 'x0', 'v'). thresholding: diffusers' dynamic thresholding of
    each x0 prediction (dynamic_thresholding_ratio, sample_max_value); clip_x0: clip x0 to [-1, 1].
    x_init [B, H, W, C] replaces the x_T drawn from the key. Returns SampleResult(samples [B, H, W, C], nfe=N).
"""


def dpm_solver_pp_sample(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    key,
    shape,
    *,
    steps: int | None = None,
    order: int = 2,
    grid="uniform",
    spacing: str = "linspace",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    prediction: str = "eps",
    cond=None,
    x_init=None,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    clip_x0: bool = False,
    var_type: str | None = None,
    dtype=jnp.float32,
) -> SampleResult:
    """DPM-Solver++ multistep ("2M" for order 2, "3M" for order 3), as diffusers' DPMSolverMultistepScheduler
    (algorithm_type='dpmsolver++'): first step order 1, then order 2 (order 3 from the third step), the last
    step order 1 and, with lower_order_final and fewer than 15 steps, the second-to-last at most order 2.
    """
    plan = solver_plan(
        schedule, "dpmpp_multistep", steps=steps, order=order, grid=grid, spacing=spacing, prediction=prediction,
        solver_type=solver_type, lower_order_final=lower_order_final, thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value, clip_x0=clip_x0,
        var_type=var_type,
    )  # fmt: skip
    return solve(plan, denoise_fn, key, shape, cond=cond, x_init=x_init, dtype=dtype)


def dpm_solver_pp_singlestep_sample(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    key,
    shape,
    *,
    steps: int | None = None,
    order: int = 2,
    grid="uniform",
    spacing: str = "linspace",
    solver_type: str = "midpoint",
    prediction: str = "eps",
    cond=None,
    x_init=None,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    clip_x0: bool = False,
    var_type: str | None = None,
    dtype=jnp.float32,
) -> SampleResult:
    """DPM-Solver++ singlestep ("2S"), as diffusers' DPMSolverSinglestepScheduler: the steps pair up as
    (order 1 to an intermediate point, order 2 from the pair's start over both intervals), N steps = N model
    calls; an even N ends with two first-order steps, an odd N with one.
    """
    plan = solver_plan(
        schedule, "dpmpp_singlestep", steps=steps, order=order, grid=grid, spacing=spacing, prediction=prediction,
        solver_type=solver_type, thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value, clip_x0=clip_x0, var_type=var_type,
    )  # fmt: skip
    return solve(plan, denoise_fn, key, shape, cond=cond, x_init=x_init, dtype=dtype)


def unipc_sample(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    key,
    shape,
    *,
    steps: int | None = None,
    order: int = 2,
    grid="uniform",
    spacing: str = "linspace",
    solver_type: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector=(),
    prediction: str = "eps",
    cond=None,
    x_init=None,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    clip_x0: bool = False,
    var_type: str | None = None,
    dtype=jnp.float32,
) -> SampleResult:
    """UniPC multistep (data prediction), as diffusers' UniPCMultistepScheduler: a UniP-`order` predictor with
    the same warm-up and lower-order-final rules, and after every step but the last a UniC corrector that reuses
    the next step's model call (so N steps = N model calls). The model is evaluated at the uncorrected sample.
    """
    plan = solver_plan(
        schedule, "unipc", steps=steps, order=order, grid=grid, spacing=spacing, prediction=prediction,
        solver_type=solver_type, lower_order_final=lower_order_final, disable_corrector=disable_corrector,
        thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value, clip_x0=clip_x0, var_type=var_type,
    )  # fmt: skip
    return solve(plan, denoise_fn, key, shape, cond=cond, x_init=x_init, dtype=dtype)


for _f in (dpm_solver_pp_sample, dpm_solver_pp_singlestep_sample, unipc_sample):
    _f.__doc__ += _PLAN_DOC
del _f

__all__ = [
    "DPM_SOLVER_TYPES",
    "SOLVER_GRIDS",
    "SOLVER_METHODS",
    "TIMESTEP_SPACINGS",
    "UNIPC_SOLVER_TYPES",
    "SolverGrid",
    "SolverPlan",
    "SolverState",
    "dpm_solver_pp_sample",
    "dpm_solver_pp_singlestep_sample",
    "dynamic_threshold",
    "solve",
    "solver_grid",
    "solver_init",
    "solver_plan",
    "solver_step",
    "unipc_sample",
]
