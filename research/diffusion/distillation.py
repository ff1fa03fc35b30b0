"""Progressive distillation (Salimans & Ho 2022) on a discrete VP schedule.

Round r distils a teacher sampling with N = start_steps / 2^r DDIM (eta=0) steps into a student
taking N/2 steps. Both grids use trailing spacing over the T training timesteps
(`pd_timesteps`), which nests: the student's grid is every other teacher timestep, ending at the
top timestep T-1, so student step j (from student step index j to j-1, or to clean data at j=0)
spans teacher steps 2j+1 -> 2j -> 2j-1 (clean data when j=0).

Notation, with alpha = sqrt(abar), sigma = sqrt(1 - abar) at the student time t, t' (teacher
midpoint), t'' (the student's next time; alpha'' = 1, sigma'' = 0 at the end of the chain):

    teacher:  z' = DDIM(z, t -> t'),  z'' = DDIM(z', t' -> t'')
    target:   x0~ = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha)     (Alg. 2)

so that one student DDIM step from (z, t) with x0-prediction x0~ lands exactly on z''. Writing a
DDIM step as z_b = (sigma_b/sigma_a) z_a + c(a->b) x0_hat with c(a->b) = alpha_b - sigma_b alpha_a/sigma_a,
the same target is the convex combination

    x0~ = w1 x0_hat(z, t) + w2 x0_hat(z', t'),  w1 = (sigma''/sigma') c(t->t') / c(t->t''),
                                                w2 = c(t'->t'') / c(t->t''),  w1 + w2 = 1,

which we use because it never subtracts two nearly equal O(1) numbers: the paper's form divides a
difference of size ~(alpha'' - alpha) by itself, which loses ~4 digits in float32 at high noise.
At the last student step w1 = 0 and w2 = 1: the target is the teacher's x0 prediction at t'.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion.gaussian import (
    _check_prediction,
    extract,
    interpret_output,
    predict_eps_from_x0,
    training_target,
)
from research.diffusion.samplers import ddim_step
from research.diffusion.schedules import Schedule, respace

PD_WEIGHTINGS = ("truncated_snr", "snr_plus_one", "none")


class PDTarget(NamedTuple):
    """target has x_t's shape, in the student's parameterisation; weight is [B] (or scalar for scalar t)."""

    target: jnp.ndarray
    weight: jnp.ndarray


# ----------------------------------------------------------------------------------- round structure


def pd_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Trailing grid of `steps` of the T training timesteps: round((i+1) T / steps) - 1, i < steps.

    Rounding is half-up in exact integer arithmetic, so that pd_timesteps(T, N // 2) equals
    pd_timesteps(T, N)[1::2] for every even N <= T (both evaluate the same rational number). This is
    diffusers' 'trailing' spacing up to tie-breaking; it always ends at T-1, the noisiest step.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an int in [1, {num_timesteps}], got {steps!r}")
    T, n = int(num_timesteps), int(steps)
    return [(2 * (i + 1) * T + n) // (2 * n) - 1 for i in range(n)]


def pd_num_rounds(start_steps: int, final_steps: int = 1) -> int:
    """Number of halvings start_steps -> ... -> final_steps; the ratio must be a power of two."""
    if not isinstance(start_steps, (int, np.integer)) or not isinstance(final_steps, (int, np.integer)):
        raise ValueError(f"step counts must be ints, got {start_steps!r}, {final_steps!r}")
    if final_steps < 1 or start_steps < final_steps or start_steps % final_steps:
        raise ValueError(f"need start_steps a multiple of final_steps >= 1, got {start_steps}, {final_steps}")
    ratio = start_steps // final_steps
    if ratio & (ratio - 1):
        raise ValueError(
            f"start_steps / final_steps = {ratio} is not a power of two; progressive distillation halves the "
            f"step count each round, so pick e.g. start_steps = {final_steps * 2 ** round(math.log2(ratio))}"
        )
    return ratio.bit_length() - 1


def pd_round_steps(start_steps: int, round_index: int) -> tuple[int, int]:
    """(teacher_steps, student_steps) of round `round_index` (0-based): (N, N/2) with N = start_steps / 2^round."""
    if not isinstance(round_index, (int, np.integer)) or round_index < 0:
        raise ValueError(f"round_index must be a non-negative int, got {round_index!r}")
    if start_steps < 2 or start_steps % (2 ** (round_index + 1)):
        raise ValueError(
            f"round {round_index} needs start_steps divisible by 2^{round_index + 1} so the teacher's step count "
            f"is even; got start_steps={start_steps} (rounds available: see pd_num_rounds)"
        )
    teacher = start_steps >> round_index
    return teacher, teacher // 2


def pd_student_schedule(teacher_schedule: Schedule) -> Schedule:
    """The student's grid: every other teacher step (indices 1, 3, ..., N-1), keeping the top one."""
    n = teacher_schedule.num_steps
    if n < 2 or n % 2:
        raise ValueError(f"the teacher schedule needs an even number of steps >= 2, got {n}")
    return respace(teacher_schedule, range(1, n, 2))


def pd_schedules(schedule: Schedule, start_steps: int, round_index: int) -> tuple[Schedule, Schedule]:
    """(teacher, student) schedules of a round, respaced from the full training `schedule`."""
    teacher_steps, _ = pd_round_steps(start_steps, round_index)
    teacher = respace(schedule, pd_timesteps(schedule.num_steps, teacher_steps))
    return teacher, pd_student_schedule(teacher)


# ------------------------------------------------------------------------------------------ targets


def _pd_tables(teacher_schedule: Schedule) -> dict[str, np.ndarray]:
    """float64 per-student-step coefficients, indexed by the student step j in [0, N/2)."""
    n = teacher_schedule.num_steps
    if n < 2 or n % 2:
        raise ValueError(f"the teacher schedule needs an even number of steps >= 2, got {n}")
    abar = teacher_schedule.alphas_cumprod
    j = np.arange(n // 2)
    ab_t = abar[2 * j + 1]
    ab_mid = abar[2 * j]
    ab_end = np.where(j == 0, 1.0, abar[np.maximum(2 * j - 1, 0)])
    a, s = np.sqrt(ab_t), np.sqrt(1.0 - ab_t)
    a1, s1 = np.sqrt(ab_mid), np.sqrt(1.0 - ab_mid)
    a2, s2 = np.sqrt(ab_end), np.sqrt(1.0 - ab_end)
    c_t_mid = a1 - s1 * a / s
    c_t_end = a2 - s2 * a / s
    c_mid_end = a2 - s2 * a1 / s1
    snr = ab_t / (1.0 - ab_t)
    return {
        "w1": (s2 / s1) * c_t_mid / c_t_end,
        "w2": c_mid_end / c_t_end,
        "snr": snr,
    }


def pd_x0_target(
    teacher_denoise,
    teacher_schedule: Schedule,
    x_t,
    student_index,
    cond=None,
    *,
    prediction: str = "v",
    clip_x0: bool = False,
):
    """x0~ such that one student DDIM step from (x_t, t) equals the teacher's two DDIM steps.

    teacher_denoise(x [B, ...], t_model [B] int32, cond) -> output, like the samplers' denoiser;
    teacher_schedule has N (even) steps; x_t [B, ...] is at student step `student_index` (scalar or
    [B] ints in [0, N/2)), i.e. teacher step 2j+1. Two teacher evaluations. Returns x0~ [B, ...].
    """
    _check_prediction(prediction)
    tables = _pd_tables(teacher_schedule)
    j = jnp.asarray(student_index, jnp.int32)
    i = 2 * j + 1
    t_table = jnp.asarray(np.asarray(teacher_schedule.timesteps, np.int32))
    batch = x_t.shape[0]

    def model_t(idx):
        return jnp.broadcast_to(t_table[idx], (batch,))

    out1 = teacher_denoise(x_t, model_t(i), cond)
    x0_first = interpret_output(teacher_schedule, x_t, i, out1, prediction=prediction, clip_x0=clip_x0).x0
    z_mid = ddim_step(teacher_schedule, x_t, i, out1, eta=0.0, prediction=prediction, clip_x0=clip_x0)
    z_mid = z_mid.astype(x_t.dtype)
    out2 = teacher_denoise(z_mid, model_t(i - 1), cond)
    x0_second = interpret_output(teacher_schedule, z_mid, i - 1, out2, prediction=prediction, clip_x0=clip_x0).x0
    w1 = extract(tables["w1"], j, x_t.ndim, x_t.dtype)
    w2 = extract(tables["w2"], j, x_t.ndim, x_t.dtype)
    return (w1 * x0_first + w2 * x0_second).astype(x_t.dtype)


def pd_loss_weight(teacher_schedule: Schedule, student_index, prediction: str, weighting: str = "truncated_snr"):
    """Weight on the student's per-example MSE in its own parameterisation ([B], or scalar for scalar j).

    Salimans & Ho (Sec. 4) weight the x-space error ||x0 - x0_hat||^2 by:
      'truncated_snr': max(SNR, 1)    (= max(||x0 err||^2, ||eps err||^2), the paper's choice)
      'snr_plus_one':  SNR + 1        (= an unweighted MSE on v)
    and 'none' is weight 1 on whatever the student outputs. Since at fixed x_t the errors relate as
    ||eps err||^2 = SNR ||x0 err||^2 and ||v err||^2 = (SNR + 1) ||x0 err||^2, the x-space weight is
    divided by 1, SNR or SNR + 1 for x0-, eps- or v-students; e.g. truncated SNR for a v-student is
    max(abar, 1 - abar).
    """
    _check_prediction(prediction)
    if weighting not in PD_WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid values: {', '.join(PD_WEIGHTINGS)}")
    snr = _pd_tables(teacher_schedule)["snr"]
    if weighting == "none":
        table = np.ones_like(snr)
    else:
        x_weight = np.maximum(snr, 1.0) if weighting == "truncated_snr" else snr + 1.0
        per_unit = {"x0": np.ones_like(snr), "eps": snr, "v": snr + 1.0}[prediction]
        table = x_weight / per_unit
    return jnp.asarray(table, jnp.float32)[jnp.asarray(student_index, jnp.int32)]


def pd_target(
    teacher_denoise,
    teacher_schedule: Schedule,
    x_t,
    student_index,
    cond=None,
    *,
    teacher_prediction: str = "v",
    student_prediction: str = "v",
    weighting: str = "truncated_snr",
    clip_x0: bool = False,
) -> PDTarget:
    """The student's regression target at (x_t, student step j) and its loss weight.

    The target is x0~ (`pd_x0_target`) expressed in the student's parameterisation through the
    repo's own conversions: eps~ = (x_t - alpha x0~)/sigma, v~ = alpha eps~ - sigma x0~. It carries no
    gradient (the teacher is fixed). See `pd_loss_weight` for the weight.

    Prefer v (or x0) for both models: at the top step alpha = sqrt(abar_T) is ~6e-3 (linear, T=1000) or
    ~5e-5 (cosine), and the eps -> x0 conversion divides by it, so an eps teacher or student
    amplifies float32 rounding by 1/alpha there (Salimans & Ho, Sec. 4).
    """
    _check_prediction(student_prediction)
    x0 = pd_x0_target(
        teacher_denoise, teacher_schedule, x_t, student_index, cond, prediction=teacher_prediction, clip_x0=clip_x0
    )
    i = 2 * jnp.asarray(student_index, jnp.int32) + 1
    eps = predict_eps_from_x0(teacher_schedule, x_t, i, x0)
    target = training_target(teacher_schedule, x0, i, eps, student_prediction).astype(x_t.dtype)
    weight = pd_loss_weight(teacher_schedule, student_index, student_prediction, weighting)
    return PDTarget(target=jax.lax.stop_gradient(target), weight=weight)


def pd_loss(student_output, pd: PDTarget):
    """Per-example weighted MSE, shape [B]: weight * mean over non-batch dims of (output - target)^2."""
    if student_output.shape != pd.target.shape:
        raise ValueError(f"student output shape {student_output.shape} != target shape {pd.target.shape}")
    dt = jnp.promote_types(student_output.dtype, jnp.float32)
    err = jnp.square(student_output.astype(dt) - pd.target.astype(dt))
    return pd.weight.astype(dt) * jnp.mean(err, axis=tuple(range(1, err.ndim)))


__all__ = [
    "PDTarget",
    "PD_WEIGHTINGS",
    "pd_loss",
    "pd_loss_weight",
    "pd_num_rounds",
    "pd_round_steps",
    "pd_schedules",
    "pd_student_schedule",
    "pd_target",
    "pd_timesteps",
    "pd_x0_target",
]
