"""Ancestral DDPM and generalised DDIM samplers.

Each sampler runs its whole reverse chain in one `jax.lax.fori_loop`, so a jitted sampler compiles
the denoiser once regardless of the number of steps. Callers jit with the schedule, shape and
denoiser closed over (they are static), e.g. `jax.jit(lambda key: ddim_sample(f, sched, key, shape))`.

Denoiser contract: `denoise_fn(x_t [B, H, W, C], t_model [B] int32, cond) -> output`, where t_model
holds ORIGINAL training timesteps (`schedule.timesteps[i]`), and `cond` is passed through untouched.

Randomness: `key` is split once into (init_key, noise_key). x_T = normal(init_key) and the noise
injected at step index i is normal(fold_in(noise_key, i)). Both samplers share this derivation, so
DDIM with eta=1 on a full schedule reproduces DDPM (fixed_small) draw for draw, and a deterministic
DDIM run depends on the key only through x_T.

`sample` also dispatches to the fast ODE solvers of research.diffusion.solvers (DPM-Solver++ 2M/3M/2S, UniPC),
which draw x_T the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion.gaussian import (
    _check_prediction,
    _check_var_type,
    extract,
    interpret_output,
    q_posterior,
)
from research.diffusion.sampling_common import DenoiseFn, SampleResult, split_sample_key
from research.diffusion.schedules import Schedule
from research.diffusion.solvers import dpm_solver_pp_sample, dpm_solver_pp_singlestep_sample, unipc_sample

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2s", "unipc")


def step_noise(noise_key, i, shape, dtype=jnp.float32):
    """Noise injected at step index i. Keyed by i, not by loop order, so respaced or partial
    chains that visit step i draw the same noise."""
    return jax.random.normal(jax.random.fold_in(noise_key, i), shape, dtype)


def _step_mask(i, x) -> jnp.ndarray:
    # 0 at step 0 (the final x_0 is the mean: no noise), 1 elsewhere, broadcastable against x.
    m = (jnp.asarray(i) != 0).astype(x.dtype)
    return m if m.ndim == 0 else m.reshape(m.shape + (1,) * (x.ndim - 1))


def _is_concrete(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def ddpm_step(
    schedule: Schedule,
    x_t,
    i,
    output,
    *,
    noise,
    prediction: str = "eps",
    var_type: str = "fixed_small",
    clip_x0: bool = False,
):
    """One ancestral step x_t -> x_{t-1}: posterior mean at the predicted x0 plus exp(log_var / 2) * noise.

    i is the step index (scalar or [B]); no noise is added where i == 0. Returns x_{t-1}.
    """
    pred = interpret_output(schedule, x_t, i, output, prediction=prediction, var_type=var_type, clip_x0=clip_x0)
    mean, _, _ = q_posterior(schedule, pred.x0, x_t, i)
    return mean + _step_mask(i, x_t) * jnp.exp(0.5 * pred.log_variance) * noise


def ddim_step(
    schedule: Schedule,
    x_t,
    i,
    output,
    *,
    eta,
    noise=None,
    prediction: str = "eps",
    clip_x0: bool = False,
    var_type: str | None = None,
):
    """One generalised DDIM step (Song et al. 2021, eq. 12) from step index i to i-1.

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma * noise, with
    abar_prev = 1 at step 0 (diffusers' set_alpha_to_one=True).
    var_type None or 'fixed_small': sigma^2 = eta^2 (1-abar_prev)/(1-abar) (1-abar/abar_prev), the
    DDIM formula (equal to the respaced posterior variance). 'fixed_large' / 'learned_range':
    sigma^2 = eta^2 * the variance from `interpret_output` (for learned_range, the model's own), with
    sigma = 0 at step 0; the direction term is floored at 0 in case that variance exceeds 1 - abar_prev.
    `noise` may be None only when eta is a concrete 0.
    """
    if var_type is not None:
        _check_var_type(var_type)
    interp_var = var_type if var_type in ("fixed_large", "learned_range") else "fixed_small"
    pred = interpret_output(schedule, x_t, i, output, prediction=prediction, var_type=interp_var, clip_x0=clip_x0)
    deterministic = _is_concrete(eta) and float(eta) == 0.0
    if noise is None and not deterministic:
        raise ValueError("ddim_step needs `noise` unless eta is exactly 0")

    one_minus_prev = 1.0 - schedule.alphas_cumprod_prev
    if deterministic:
        sigma = None
        dir_coef = extract(np.sqrt(one_minus_prev), i, x_t.ndim, x_t.dtype)
    elif interp_var == "fixed_small" and _is_concrete(eta):
        # Concrete eta: form sigma and the direction coefficient in float64 before casting.
        sigma_np = float(eta) * np.sqrt(schedule.posterior_variance)
        sigma = extract(sigma_np, i, x_t.ndim, x_t.dtype)
        dir_coef = extract(np.sqrt(np.maximum(one_minus_prev - sigma_np**2, 0.0)), i, x_t.ndim, x_t.dtype)
    else:
        if interp_var == "fixed_small":
            var = extract(schedule.posterior_variance, i, x_t.ndim, x_t.dtype)
        else:
            var = _step_mask(i, x_t) * jnp.exp(pred.log_variance)
        var = jnp.asarray(eta, x_t.dtype) ** 2 * var
        sigma = jnp.sqrt(var)
        dir_coef = jnp.sqrt(jnp.maximum(extract(one_minus_prev, i, x_t.ndim, x_t.dtype) - var, 0.0))

    sqrt_prev = extract(np.sqrt(schedule.alphas_cumprod_prev), i, x_t.ndim, x_t.dtype)
    x_prev = sqrt_prev * pred.x0 + dir_coef * pred.eps
    if sigma is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def _run_chain(step_fn, denoise_fn, schedule, key, shape, cond, x_init, dtype, needs_noise):
    if len(shape) < 1:
        raise ValueError(f"shape must be [B, ...], got {shape}")
    init_key, noise_key = split_sample_key(key)
    if x_init is None:
        x = jax.random.normal(init_key, shape, dtype)
    else:
        x = jnp.asarray(x_init, dtype)
        if x.shape != tuple(shape):
            raise ValueError(f"x_init shape {x.shape} does not match shape {tuple(shape)}")
    batch = shape[0]
    t_model_table = jnp.asarray(schedule.timesteps, jnp.int32)
    S = schedule.num_steps

    def body(j, carry):
        x, nfe = carry
        i = S - 1 - j
        t_model = jnp.full((batch,), t_model_table[i], jnp.int32)
        out = denoise_fn(x, t_model, cond)
        nfe = nfe + 1
        noise = step_noise(noise_key, i, shape, dtype) if needs_noise else None
        # Keep the carry dtype fixed even if the model returns e.g. bfloat16.
        return step_fn(x, i, out, noise).astype(dtype), nfe

    x, nfe = jax.lax.fori_loop(0, S, body, (x, jnp.zeros((), jnp.int32)))
    return SampleResult(samples=x, nfe=nfe)


def ddpm_sample(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    key,
    shape,
    *,
    cond=None,
    prediction: str = "eps",
    var_type: str = "fixed_small",
    clip_x0: bool = True,
    x_init=None,
    dtype=jnp.float32,
) -> SampleResult:
    """Ancestral sampling over all steps of `schedule` (respaced schedules give respaced DDPM).

    x_init, if given, replaces the x_T drawn from the key.
    """
    _check_prediction(prediction)
    _check_var_type(var_type)

    def step_fn(x, i, out, noise):
        return ddpm_step(schedule, x, i, out, noise=noise, prediction=prediction, var_type=var_type, clip_x0=clip_x0)

    return _run_chain(step_fn, denoise_fn, schedule, key, shape, cond, x_init, dtype, needs_noise=True)


def ddim_sample(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    key,
    shape,
    *,
    eta=0.0,
    cond=None,
    prediction: str = "eps",
    clip_x0: bool = True,
    var_type: str | None = None,
    x_init=None,
    dtype=jnp.float32,
) -> SampleResult:
    """DDIM sampling over the steps of `schedule` (respace it for fewer steps); see `ddim_step`.

    With clip_x0, eps is recomputed from the clipped x0 (diffusers' use_clipped_model_output=True).
    var_type='learned_range' uses the model's variance scaled by eta^2 instead of the DDIM formula;
    the model output then has 2C channels. x_init, if given, replaces the x_T drawn from the key.
    """
    _check_prediction(prediction)
    if var_type is not None:
        _check_var_type(var_type)
    needs_noise = not (_is_concrete(eta) and float(eta) == 0.0)

    def step_fn(x, i, out, noise):
        return ddim_step(
            schedule, x, i, out, eta=eta, noise=noise, prediction=prediction, clip_x0=clip_x0, var_type=var_type
        )

    return _run_chain(step_fn, denoise_fn, schedule, key, shape, cond, x_init, dtype, needs_noise)


def sample(name: str, denoise_fn: DenoiseFn, schedule: Schedule, key, shape, **kw) -> SampleResult:
    """Dispatch by name; extra keywords go to the sampler.

    'ddpm' -> `ddpm_sample`, 'ddim' -> `ddim_sample`; 'dpm++2m' / 'dpm++3m' -> `dpm_solver_pp_sample` with
    order 2 / 3, 'dpm++2s' -> `dpm_solver_pp_singlestep_sample` (order 2), 'unipc' -> `unipc_sample` (all three
    from research.diffusion.solvers). The solvers default to every step of `schedule` (steps=None, e.g. a respaced
    schedule as is); pass steps= with the full training schedule for diffusers' grids.
    """
    if name == "ddpm":
        return ddpm_sample(denoise_fn, schedule, key, shape, **kw)
    if name == "ddim":
        return ddim_sample(denoise_fn, schedule, key, shape, **kw)
    if name == "unipc":
        return unipc_sample(denoise_fn, schedule, key, shape, **kw)
    if name == "dpm++2s":
        return dpm_solver_pp_singlestep_sample(denoise_fn, schedule, key, shape, order=2, **kw)
    if name in ("dpm++2m", "dpm++3m"):
        return dpm_solver_pp_sample(denoise_fn, schedule, key, shape, order=2 if name == "dpm++2m" else 3, **kw)
    raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")


__all__ = [
    "SAMPLERS",
    "SampleResult",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "sample",
    "split_sample_key",
    "step_noise",
]
