"""Classifier-free guidance as a wrapper over the denoiser contract, usable with any sampler unchanged.

Convention. Ho & Salimans (2022) write the guided noise prediction with a weight w >= 0:

    eps~ = (1 + w) eps(x, c) - w eps(x, null)

Imagen and diffusers use the scale s = 1 + w instead:

    eps~ = eps(x, null) + s (eps(x, c) - eps(x, null))

so s = 1 (w = 0) is the plain conditional model and s = 0 (w = -1) the unconditional one. The public wrapper
takes `scale` = s (the value `--guidance` takes); `scale_from_w` / `w_from_scale` convert. We evaluate it as
eps(x, c) + w (eps(x, c) - eps(x, null)), which is the same number and gives exactly eps(x, c) at w = 0.

Parameterisations. The denoiser may predict eps, x0 or v; guidance is defined on eps. At fixed (x_t, t) every
conversion is affine in the model output with coefficients shared by the two branches:

    eps = sqrt(abar) v + sqrt(1 - abar) x_t                    v  = (eps - sqrt(1 - abar) x_t) / sqrt(abar)
    eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)               x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)

An affine map commutes with an affine combination whose weights sum to one ((1 - s) u + s c), so converting both
branches to eps, guiding, and converting back gives exactly the guidance applied to the raw v or x0 outputs. The
wrapper therefore combines the raw outputs (avoiding the division by sqrt(abar), which vanishes at a zero-terminal-
SNR step) and only goes through eps for the one non-affine operation, guidance rescale.

Guidance rescale (Lin et al. 2024, diffusers' `rescale_noise_cfg`) is applied to the guided *noise* prediction
against the conditional noise prediction, per example, with torch's unbiased std over all non-batch entries:

    eps_r = rescale * eps~ * std(eps_c) / std(eps~) + (1 - rescale) * eps~  =  k eps~,  k a per-example scalar.

For v and x0 models this is done on the eps converted at t and mapped back as out~ + (k - 1) eps~ d, with
d = d out / d eps = 1 / sqrt(abar) (v) or -sqrt(1 - abar) / sqrt(abar) (x0). (diffusers' pipelines, given a v
model, rescale its raw v output instead; we keep the statistics in eps space for every parameterisation.) Where
abar = 0 the eps of a v or x0 model is x_t in both branches, so k = 1 and d is set to 0 there.

The sampler's t_model are ORIGINAL training timesteps (`schedule.timesteps[i]` for step index i of a possibly
respaced schedule), so the wrapper maps them back to step indices by searching schedule.timesteps.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from research.diffusion.gaussian import (
    _check_prediction,
    extract,
    predict_eps_from_v,
    predict_eps_from_x0,
)
from research.diffusion.schedules import Schedule

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


def scale_from_w(w):
    """Ho & Salimans' guidance weight w -> the diffusers/Imagen scale s = 1 + w."""
    return 1.0 + w


def w_from_scale(s):
    """The diffusers/Imagen scale s -> Ho & Salimans' weight w = s - 1."""
    return s - 1.0


def null_like(cond, null_label: int):
    """The null condition of a class-conditional `cond`: every label replaced by `null_label` (normally num_classes).

    Works on any pytree carrying a `label` [B] int array, through `.replace(label=...)` (a flax.struct dataclass
    such as research.cond.Cond) or, for a dict, its 'label' key; every other field is kept as it is. Text and
    other conditions have their own null value (the encoder's empty-prompt embedding): build that null cond
    yourself (e.g. research.cond.null_cond_like) and pass it to `guided_denoiser`.
    """
    if isinstance(cond, dict):
        label = cond.get("label")
    else:
        label = getattr(cond, "label", None)
    if label is None:
        raise ValueError(
            f"null_like needs a cond with a `label` array, got {type(cond).__name__} without one; "
            "for text or other conditions build the null cond yourself and pass it to guided_denoiser"
        )
    null = jnp.full_like(label, null_label)
    if isinstance(cond, dict):
        return {**cond, "label": null}
    if not hasattr(cond, "replace"):
        raise ValueError(f"null_like needs a dict or a dataclass with .replace(label=...), got {type(cond).__name__}")
    return cond.replace(label=null)


def _is_concrete_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _concat_cond(cond, null_cond):
    """[cond; null_cond] along the batch axis, leaf by leaf."""
    c_leaves, c_def = jax.tree.flatten(cond)
    n_leaves, n_def = jax.tree.flatten(null_cond)
    if c_def != n_def:
        raise ValueError(
            f"null_cond must have the structure of cond (same fields set): cond is {c_def}, null_cond is {n_def}"
        )
    for a, b in zip(c_leaves, n_leaves):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"null_cond leaf shape {jnp.shape(b)} differs from cond's {jnp.shape(a)}; build the null cond "
                "for the same batch (e.g. null_like(cond, num_classes))"
            )
    return jax.tree.map(lambda a, b: jnp.concatenate([jnp.asarray(a), jnp.asarray(b)], axis=0), cond, null_cond)


def _std(x):
    # torch.std's default (unbiased, N - 1) over every non-batch axis, as diffusers' rescale_noise_cfg uses.
    return jnp.std(x, axis=tuple(range(1, x.ndim)), ddof=1, keepdims=True)


class _StepIndex:
    """Maps original training timesteps t_model [B] to step indices of a (possibly respaced) schedule."""

    def __init__(self, schedule: Schedule):
        self.timesteps = np.asarray(schedule.timesteps, np.int64)

    def __call__(self, t_model):
        if not isinstance(t_model, jax.core.Tracer):
            t_np = np.asarray(t_model)
            missing = sorted(set(t_np.ravel().tolist()) - set(self.timesteps.tolist()))
            if missing:
                raise ValueError(
                    f"t_model {missing[:5]} are not timesteps of the schedule given to guided_denoiser; pass the "
                    "(respaced) schedule the sampler runs on"
                )
        table = jnp.asarray(self.timesteps, jnp.int32)
        i = jnp.clip(jnp.searchsorted(table, t_model.astype(jnp.int32)), 0, table.shape[0] - 1)
        # Inside jit an unknown timestep cannot raise; flag it so the output becomes NaN instead of silently
        # using a neighbouring step's coefficients.
        return i, table[i] == t_model


def guided_denoiser(
    denoise_fn: DenoiseFn,
    null_cond,
    *,
    scale,
    prediction: str,
    schedule: Optional[Schedule],
    channels: int,
    guide_channels: Optional[int] = None,
    interval: Optional[Tuple[int, int]] = None,
    rescale: float = 0.0,
) -> DenoiseFn:
    """Wrap `denoise_fn(x_t, t_model, cond)` into a classifier-free-guided denoiser with the same contract.

    The returned function evaluates the conditional and unconditional branches in ONE forward of batch 2B
    (x_t and t_model concatenated with themselves, cond with `null_cond` leaf by leaf along axis 0), splits the
    output and returns a [B, H, W, C] (or [B, H, W, 2C]) output in the model's own parameterisation, so any
    sampler taking `denoise_fn` works unchanged and counts one NFE per call.

    denoise_fn: (x_t [B, H, W, C], t_model [B] int32 original timesteps, cond pytree) -> [B, H, W, C or 2C].
    null_cond: the unconditional condition, same pytree structure and leaf shapes as the cond the sampler
        passes (for class labels `null_like(cond, num_classes)`; text models pass their empty-prompt cond).
    scale: s = 1 + w (diffusers' guidance_scale; 1 = no guidance). A Python number or a traced scalar. A Python
        1 returns a plain conditional denoiser: one unbatched forward, bit-identical to denoise_fn(x, t, cond).
    prediction: 'eps', 'x0' or 'v', what the first C output channels are.
    schedule: the (possibly respaced) schedule the sampler runs on; only used to convert v / x0 outputs to eps
        for `rescale`, so it may be None for eps models or when rescale == 0.
    channels: C, the channels of x_t. Output channels C..2C (learned variance: iDDPM learned_range, DiT's learned
        sigma) are taken unguided from the conditional branch.
    guide_channels: guide only output channels [0, guide_channels) of the mean part; channels guide_channels..C
        come from the conditional branch. None = all C. DiT's sample script guides 3 of its 4 latent channels
        ("for exact reproducibility"): guide_channels=3 reproduces it.
    interval: (t_lo, t_hi) in original timesteps: guidance is applied only where t_lo <= t_model <= t_hi
        (Kynkaanniemi et al. 2024); elsewhere the conditional output is returned (from the same batched forward).
    rescale: guidance_rescale in [0, 1] (Lin et al. 2024), applied in eps space as diffusers' rescale_noise_cfg;
        see the module docstring. The std is taken over all C mean channels (guided or not), never the variance.
    """
    _check_prediction(prediction)
    if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"channels must be a positive int (C of x_t), got {channels!r}")
    channels = int(channels)
    if guide_channels is None:
        guide_channels = channels
    if not isinstance(guide_channels, (int, np.integer)) or not 1 <= guide_channels <= channels:
        raise ValueError(
            f"guide_channels must be an int in [1, {channels}] or None (all channels), got {guide_channels!r}"
        )
    guide_channels = int(guide_channels)
    if interval is not None:
        if len(interval) != 2 or interval[0] > interval[1]:
            raise ValueError(f"interval must be (t_lo, t_hi) with t_lo <= t_hi in original timesteps, got {interval!r}")
        t_lo, t_hi = int(interval[0]), int(interval[1])
    if not _is_concrete_number(rescale) or not 0.0 <= float(rescale) <= 1.0:
        raise ValueError(f"rescale (guidance_rescale) must be a number in [0, 1], got {rescale!r}")
    rescale = float(rescale)
    if _is_concrete_number(scale):
        if not np.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale!r}")
        if float(scale) == 1.0:

            def conditional(x_t, t_model, cond):
                return denoise_fn(x_t, t_model, cond)

            return conditional
    needs_schedule = rescale > 0.0 and prediction != "eps"
    if needs_schedule and schedule is None:
        raise ValueError(f"guidance rescale of a {prediction!r} model needs the sampler's schedule; pass schedule=")
    step_index = _StepIndex(schedule) if needs_schedule else None
    if needs_schedule:
        sab = np.asarray(schedule.sqrt_alphas_cumprod, np.float64)
        s1m = np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64)
        # d out / d eps of the inverse conversion; 0 where abar = 0 (there eps = x_t in both branches, k = 1).
        with np.errstate(divide="ignore"):
            inv = np.where(sab > 0, 1.0 / np.where(sab > 0, sab, 1.0), 0.0)
        d_table = inv if prediction == "v" else -s1m * inv

    def guided(x_t, t_model, cond):
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition: the sampler passed cond=None")
        if x_t.shape[-1] != channels:
            raise ValueError(
                f"x_t has {x_t.shape[-1]} channels on the last axis but guided_denoiser got channels={channels}"
            )
        b = x_t.shape[0]
        t_model = jnp.asarray(t_model)
        out2 = denoise_fn(
            jnp.concatenate([x_t, x_t], axis=0),
            jnp.concatenate([t_model, t_model], axis=0),
            _concat_cond(cond, null_cond),
        )
        if out2.shape[0] != 2 * b or out2.shape[-1] not in (channels, 2 * channels):
            raise ValueError(
                f"denoise_fn returned shape {out2.shape} for a batch of {2 * b}; expected [{2 * b}, ..., C or 2C] "
                f"with C={channels}"
            )
        out_c, out_u = out2[:b], out2[b:]
        mean_c, var_c = out_c[..., :channels], out_c[..., channels:]
        mean_u = out_u[..., :channels]
        w = jnp.asarray(w_from_scale(scale), mean_c.dtype)
        g = guide_channels
        guided_part = mean_c[..., :g] + w * (mean_c[..., :g] - mean_u[..., :g])
        mean_g = guided_part if g == channels else jnp.concatenate([guided_part, mean_c[..., g:]], axis=-1)

        if rescale > 0.0:
            if prediction == "eps":
                eps_c, eps_g = mean_c, mean_g
            else:
                i, valid = step_index(t_model)
                to_eps = predict_eps_from_v if prediction == "v" else predict_eps_from_x0
                eps_c = to_eps(schedule, x_t, i, mean_c)
                eps_g = to_eps(schedule, x_t, i, mean_g)
            stat_dtype = jnp.promote_types(eps_g.dtype, jnp.float32)
            ratio = _std(eps_c.astype(stat_dtype)) / _std(eps_g.astype(stat_dtype))
            k = (rescale * ratio + (1.0 - rescale)).astype(mean_g.dtype)
            if prediction == "eps":
                mean_g = k * eps_g
            else:
                d = extract(d_table, i, x_t.ndim, mean_g.dtype)
                mean_g = mean_g + (k - 1.0) * eps_g * d
                mean_g = jnp.where(valid.reshape((b,) + (1,) * (x_t.ndim - 1)), mean_g, jnp.nan)

        if interval is not None:
            inside = (t_model >= t_lo) & (t_model <= t_hi)
            mean_g = jnp.where(inside.reshape((b,) + (1,) * (x_t.ndim - 1)), mean_g, mean_c)
        if var_c.shape[-1] == 0:
            return mean_g
        return jnp.concatenate([mean_g, var_c], axis=-1)

    return guided


__all__ = ["guided_denoiser", "null_like", "scale_from_w", "w_from_scale"]
