"""Text-to-image with a local Stable Diffusion folder, reproducing diffusers' StableDiffusionPipeline in JAX.

    python -m research.generate --pretrained DIR --prompt "a photo of a cat" [--prompt ... | --prompts FILE]
        [--negative-prompt TEXT (once, or once per prompt)] [--guidance 7.5] [--steps 25]
        [--sampler dpmpp_2m|ddim] [--eta 0] [--seed 0] [--num 4] [--height H --width W] [--latents FILE.npy]
        [--batch-size 4] [--guidance-rescale 0] [--dtype float32|bfloat16]
        [--controlnet CN_DIR --hint IMAGE [--control-scale 1.0] (repeatable)] [--guess-mode] --out DIR

DIR is what `StableDiffusionPipeline.save_pretrained` writes (research/pretrained/convert_sd.py reads it; nothing is
downloaded), or a workdir converted from one with `python -m research.pretrained.sd_workdir` (the same images).
--num images are drawn per prompt, prompt-major (diffusers' num_images_per_prompt order). Writes
  OUT/00000.png ...                one PNG per image
  OUT/samples.npz                  images uint8 [N, H, W, 3], prompts [N] and negative_prompts [N] (str), seed,
                                   guidance, steps, sampler, eta, height, width, dtype, pretrained, sha256 (JSON
                                   of the components' checksums); `python -m research.evaluate clipscore
                                   --samples OUT/samples.npz --clip ...` reads its 'images' and 'prompts'.

What is computed (diffusers 0.42, pipeline_stable_diffusion.py, scheduling_ddim.py,
scheduling_dpmsolver_multistep.py):
  text     ids = bos + BPE + eos, padded with the tokenizer's pad id to 77 (an over-long prompt keeps its first 75
           tokens: a warning says how many were dropped); hidden = the text encoder's last_hidden_state (final
           LayerNorm of the last layer; SD 2.x folders ship their encoder cut at OpenCLIP's penultimate layer).
           An empty negative prompt is the unconditional text.
  loop     one jitted lax.scan over the steps. With guidance s != 1 the U-Net sees the batch [uncond; cond]
           concatenated (diffusers' order) and eps~ = eps_u + s (eps_c - eps_u) (diffusers' guidance_scale
           s = 1 + w of Ho & Salimans). s = 1 runs the conditional branch alone. (diffusers skips guidance for every
           s <= 1; here s < 1 still extrapolates towards the unconditional prediction.)
  sampler  the folder's scheduler_config read as diffusers' `<Sampler>.from_config(pipe.scheduler.config)` would:
           betas (linear / scaled_linear / squaredcos_cap_v2 / trained_betas), num_train_timesteps, steps_offset,
           timestep_spacing (leading / trailing / linspace; a key the file lacks takes the sampler class's
           default, as diffusers' from_config does), prediction_type (epsilon / v_prediction / sample).
           ddim: DDIMScheduler.step (prev timestep t - T // steps, set_alpha_to_one, clip_sample, eta > 0 draws
           noise from jax.random). dpmpp_2m: DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint or heun
           from the config, first order at the first step and, with final_sigmas_type 'zero' or fewer than 15
           steps, at the last). The initial noise is scaled by init_noise_sigma (1 for both).
  decode   the VAE decoder of latents / scaling_factor, then (x / 2 + 0.5) clipped to [0, 1]; PNGs are
           round(255 x) as diffusers' numpy_to_pil.
Initial noise: --latents FILE.npy holds [N, 4, H/8, W/8] (diffusers' NCHW, e.g. the `latents=` passed to the
pipeline) or [N, H/8, W/8, 4] (NHWC); a [N, 4, 4, 4] array is read as NCHW. Otherwise image j's noise is
jax.random.normal(fold_in(PRNGKey(seed), j)), so it does not depend on --batch-size.
ControlNet (--controlnet, a diffusers ControlNetModel folder read by research/pretrained/convert_controlnet.py, with
its --hint image, RGB in [0, 1] resized to the output size with Lanczos as diffusers' control image processor):
as StableDiffusionControlNetPipeline, the ControlNet sees the U-Net's batch and text (both guidance halves) and the
hint, its residuals times --control-scale are added to the U-Net's skips and middle block; several are summed.
--guess-mode: the control runs on the conditional half only (zeros for the unconditional one) with residual i of n
scaled by 10 ** (-(n - i) / n) (diffusers' logspace; the reference code's 0.825 ** (12 - i) is
research.models.controlnet.GUESS_MODE_RATIO). A run of task='controlnet' controls a pixel-space U-Net and is
sampled with research.sample.
Each of the three programs (text encoder, sampling loop, VAE decoder) compiles once per batch shape; the last
batch is padded to the batch size. --dtype bfloat16 runs all three networks in bfloat16 (parameters, GroupNorm
statistics, softmax and the sampler's arithmetic stay float32).

Library use:
    sd = StableDiffusion.from_pretrained(DIR)                  # or StableDiffusion(read_diffusers_pipeline(DIR))
    cond, uncond = sd.encode_prompts(prompts, negative_prompts)  # [N, 77, D] float32 each
    images = sd.generate(prompts, negative_prompts, steps=25, guidance=7.5, sampler="dpmpp_2m", seed=0)
    # float32 [N, H, W, 3] in [0, 1]; latents=... (NHWC or NCHW) replaces the seeded noise
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Dict, Optional, Sequence

import numpy as np

SAMPLERS = ("dpmpp_2m", "ddim")
DTYPES = ("float32", "bfloat16")


class GenerateError(ValueError):
    """A request the pipeline cannot serve (bad size, prompt count, latents shape, scheduler setting); one line."""


# --- scheduler -------------------------------------------------------------------------------------------------------

# Defaults of the target scheduler classes (diffusers 0.42) for keys a config lacks.
_DEFAULTS = {
    "common": dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        prediction_type="epsilon",
        thresholding=False,
        steps_offset=0,
        rescale_betas_zero_snr=False,
    ),
    "ddim": dict(timestep_spacing="leading", set_alpha_to_one=True, clip_sample=True, clip_sample_range=1.0),
    "dpmpp_2m": dict(
        timestep_spacing="linspace",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        final_sigmas_type="zero",
        lambda_min_clipped=-math.inf,
        variance_type=None,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
    ),
}


def scheduler_settings(config: dict, sampler: str) -> dict:
    """The settings `sampler` runs with for a folder's scheduler_config: the config's values for the keys the
    sampler's diffusers class takes, else that class's defaults. This is diffusers'
    `<Sampler>.from_config(StableDiffusionPipeline.from_pretrained(DIR).scheduler.config)`: a key the file lacks
    is marked a default value (_use_default_values) there and so also takes the new class's default (e.g. an
    old SD 1.x PNDM config without timestep_spacing gives DDIM 'leading' but DPM-Solver 'linspace')."""
    if sampler not in SAMPLERS:
        raise GenerateError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    out = {**_DEFAULTS["common"], **_DEFAULTS[sampler]}
    # A null in a saved config is the class default (trained_betas: null means "use beta_schedule").
    out.update({k: v for k, v in config.items() if k in out and v is not None})
    if sampler == "dpmpp_2m":
        out["lambda_min_clipped"] = float(out["lambda_min_clipped"])
    bad = []
    if out["thresholding"]:
        bad.append("thresholding=true")
    if out["rescale_betas_zero_snr"]:
        bad.append("rescale_betas_zero_snr=true")
    if out["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        bad.append(f"prediction_type={out['prediction_type']!r}")
    if out["timestep_spacing"] not in ("leading", "trailing", "linspace"):
        bad.append(f"timestep_spacing={out['timestep_spacing']!r}")
    if sampler == "dpmpp_2m":
        bad += [f"{k}=true" for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if out[k]]
        bad += [f"{k}=true" for k in ("use_lu_lambdas", "use_flow_sigmas") if out[k]]
        if out["variance_type"] is not None:
            bad.append(f"variance_type={out['variance_type']!r}")
        if out["solver_type"] not in ("midpoint", "heun"):
            bad.append(f"solver_type={out['solver_type']!r}")
        if out["final_sigmas_type"] not in ("zero", "sigma_min"):
            bad.append(f"final_sigmas_type={out['final_sigmas_type']!r}")
    if bad:
        raise GenerateError(f"scheduler_config.json sets {', '.join(bad)}: not supported by the {sampler} sampler here")
    return out


def alphas_cumprod(settings: dict) -> np.ndarray:
    """float32 [T] cumulative products of 1 - beta, computed in float32 as diffusers does."""
    from research.diffusion.schedules import get_betas

    T = int(settings["num_train_timesteps"])
    if settings["trained_betas"] is not None:
        betas = np.asarray(settings["trained_betas"], np.float64)
        if betas.shape != (T,):
            raise GenerateError(f"scheduler_config.json trained_betas has {betas.size} entries, expected {T}")
    else:
        name = settings["beta_schedule"]
        if name not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise GenerateError(f"scheduler_config.json beta_schedule={name!r} is not supported")
        betas = get_betas(name, T, beta_start=float(settings["beta_start"]), beta_end=float(settings["beta_end"]))
    alphas = np.float32(1.0) - betas.astype(np.float32)
    return np.cumprod(alphas, dtype=np.float32)


def _spaced(spacing: str, T: int, n: int, offset: int, last: int, dpm: bool) -> np.ndarray:
    """diffusers' set_timesteps spacing (DDIM: n of T; DPM-Solver: n of n + 1, the last dropped), descending."""
    if dpm:
        if spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + offset
        return np.arange(last, 0, -T / n).round().astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """Per-step constants of one sampler run, all float32 [S] (timesteps int64 [S]); see `sampling_plan`.

    x0 = x0_x * x + x0_out * out and eps = eps_x * x + eps_out * out convert the guided model output at step i.
    ddim:      x <- next_x0 * x0 + next_eps * eps + noise_std * z
    dpmpp_2m:  x <- next_x * x + next_x0 * x0 + next_d1 * (x0 - previous step's x0)
    """

    sampler: str
    timesteps: np.ndarray
    x0_x: np.ndarray
    x0_out: np.ndarray
    eps_x: np.ndarray
    eps_out: np.ndarray
    next_x: np.ndarray
    next_x0: np.ndarray
    next_eps: np.ndarray
    next_d1: np.ndarray
    noise_std: np.ndarray
    clip_range: Optional[float]
    init_noise_sigma: float


def _conversion(prediction: str, alpha: np.ndarray, sigma: np.ndarray):
    """(x0_x, x0_out, eps_x, eps_out) for a model output of `prediction` at x = alpha x0 + sigma eps."""
    one, zero = np.ones_like(alpha), np.zeros_like(alpha)
    if prediction == "epsilon":
        return 1 / alpha, -sigma / alpha, zero, one
    if prediction == "v_prediction":
        return alpha, -sigma, sigma, alpha
    return zero, one, 1 / sigma, -alpha / sigma  # "sample"


def sampling_plan(config: dict, sampler: str, steps: int, eta: float = 0.0) -> SamplingPlan:
    """The timesteps and per-step coefficients diffusers' DDIMScheduler / DPMSolverMultistepScheduler (built
    from_config(config)) use for `steps` steps. Coefficients are formed in float64 from diffusers' float32
    alphas_cumprod, then rounded to float32."""
    s = scheduler_settings(config, sampler)
    T, n = int(s["num_train_timesteps"]), int(steps)
    if not 1 <= n <= T:
        raise GenerateError(f"--steps {n}: give 1 .. {T} (the scheduler's num_train_timesteps)")
    if not eta >= 0:
        raise GenerateError(f"--eta {eta}: give a value >= 0 (0: deterministic DDIM, 1: DDPM-like)")
    if sampler != "ddim" and eta:
        raise GenerateError(f"--eta applies to the ddim sampler only (got --eta {eta} with {sampler})")
    acp32 = alphas_cumprod(s)
    acp = acp32.astype(np.float64)
    offset, spacing, pred = int(s["steps_offset"]), s["timestep_spacing"], s["prediction_type"]
    f32 = lambda a: np.asarray(a, np.float32)
    zeros = np.zeros(n)
    if sampler == "ddim":
        ts = _spaced(spacing, T, n, offset, T, dpm=False)
        if ts.max() >= T or ts.min() < 0:
            raise GenerateError(f"steps_offset={offset} with {n} {spacing} steps gives timesteps outside 0..{T - 1}")
        prev = ts - T // n  # diffusers' DDIM steps back by T // n whatever the spacing
        final = 1.0 if s["set_alpha_to_one"] else acp[0]
        a_t = acp[ts]
        a_prev = np.where(prev >= 0, acp[np.clip(prev, 0, T - 1)], final)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * np.sqrt(variance)
        conv = _conversion(pred, np.sqrt(a_t), np.sqrt(1 - a_t))
        return SamplingPlan(
            sampler,
            ts,
            *map(f32, conv),
            next_x=f32(zeros),
            next_x0=f32(np.sqrt(a_prev)),
            next_eps=f32(np.sqrt(np.maximum(1 - a_prev - std**2, 0.0))),
            next_d1=f32(zeros),
            noise_std=f32(std),
            clip_range=float(s["clip_sample_range"]) if s["clip_sample"] else None,
            init_noise_sigma=1.0,
        )
    # DPM-Solver++(2M) in the (alpha, sigma) of the VP process; sigmas are diffusers' VE sigmas.
    lambdas = np.log(np.sqrt(acp32)) - np.log(np.sqrt(1 - acp32))
    clipped = int(np.searchsorted(lambdas[::-1], s["lambda_min_clipped"]))
    ts = _spaced(spacing, T, n, offset, T - clipped, dpm=True)
    if ts.max() >= T or ts.min() < 0:
        raise GenerateError(f"steps_offset={offset} with {n} {spacing} steps gives timesteps outside 0..{T - 1}")
    ve = np.sqrt((1 - acp32) / acp32).astype(np.float32)
    last = np.sqrt((1 - acp[0]) / acp[0]) if s["final_sigmas_type"] == "sigma_min" else 0.0
    sig = np.concatenate([ve[ts], [last]]).astype(np.float32).astype(np.float64)
    alpha = 1 / np.sqrt(sig**2 + 1)
    sigma = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at a final sigma of 0
    h = lam[1:] - lam[:-1]
    expm = np.exp(-h) - 1.0  # -1 where h = inf
    next_x = sigma[1:] / sigma[:-1]
    next_x0 = -alpha[1:] * expm
    first = np.zeros(n, bool)
    first[0] = True
    if s["euler_at_final"] or (s["lower_order_final"] and n < 15) or s["final_sigmas_type"] == "zero":
        first[-1] = True
    d1 = np.zeros(n)
    for i in range(1, n):
        if first[i]:
            continue
        r0 = (lam[i] - lam[i - 1]) / h[i]
        if s["solver_type"] == "midpoint":
            d1[i] = 0.5 * next_x0[i] / r0
        else:
            d1[i] = alpha[i + 1] * (expm[i] / h[i] + 1.0) / r0
    conv = _conversion(pred, alpha[:-1], sigma[:-1])
    return SamplingPlan(
        sampler,
        ts,
        *map(f32, conv),
        next_x=f32(next_x),
        next_x0=f32(next_x0),
        next_eps=f32(zeros),
        next_d1=f32(d1),
        noise_std=f32(zeros),
        clip_range=None,
        init_noise_sigma=1.0,
    )


def sampler_update(sampler: str, clip_range, row: dict, x, out, prev_x0, noise=None):
    """One scheduler step: (x at the next timestep, this step's x0 prediction), given the guided model output
    `out` at x, the previous step's x0 (DPM-Solver's second-order term; zeros at the first step) and, for DDIM with
    eta > 0, standard-normal noise. `row` holds one step's SamplingPlan coefficients (scalars); the arithmetic is
    diffusers' DDIMScheduler.step / DPMSolverMultistepScheduler.step with their coefficients pre-combined."""
    x0 = row["x0_x"] * x + row["x0_out"] * out
    if sampler == "ddim":
        eps = row["eps_x"] * x + row["eps_out"] * out
        if clip_range is not None:
            x0 = x0.clip(-clip_range, clip_range)
        new = row["next_x0"] * x0 + row["next_eps"] * eps
        if noise is not None:
            new = new + row["noise_std"] * noise
        return new, x0
    return row["next_x"] * x + row["next_x0"] * x0 + row["next_d1"] * (x0 - prev_x0), x0


def plan_rows(plan: SamplingPlan) -> list:
    """The plan as one dict of numpy scalars per step (for sampler_update outside jit)."""
    return [{k: getattr(plan, k)[i] for k in _PLAN_ROWS} for i in range(len(plan.timesteps))]


# --- jitted programs -------------------------------------------------------------------------------------------------


def _frozen(fields: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.items()))


def _jnp_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


@functools.lru_cache(maxsize=None)
def _text_program(fields: tuple, dtype: str, output_layer: int):
    import jax
    import jax.numpy as jnp

    from research.models.clip import CLIPTextTransformer

    model = CLIPTextTransformer(**dict(fields), dtype=_jnp_dtype(dtype))

    @jax.jit
    def encode(params, tokens):
        hidden, _ = model.apply({"params": params}, tokens, output_layer=output_layer)
        return hidden.astype(jnp.float32)

    return encode


@functools.lru_cache(maxsize=None)
def _vae_program(fields: tuple, dtype: str):
    import jax
    import jax.numpy as jnp

    from research.models.vae import AutoencoderKL

    model = AutoencoderKL(**dict(fields), dtype=_jnp_dtype(dtype))

    @jax.jit
    def decode(params, latents, scaling_factor):
        x = model.apply({"params": params}, latents / scaling_factor, method=AutoencoderKL.decode)
        return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    return decode


@functools.lru_cache(maxsize=None)
def _loop_program(
    fields: tuple,
    dtype: str,
    sampler: str,
    guided: bool,
    stochastic: bool,
    clip_range,
    rescale: bool,
    controls: tuple = (),
    guess_mode: bool = False,
):
    """jit(run(params, x [B, h, w, c], text [2B or B, L, D], plan arrays, keys [B], guidance, guidance_rescale,
    control params, hints, control scales)).

    Static: the U-Net architecture, dtype, sampler kind, which optional terms exist and the ControlNets'
    architectures (controls: one frozen field tuple per ControlNet); the coefficient arrays, guidance, rescale and
    the conditioning scales are arguments, so a new step count or guidance reuses the program per shape."""
    import jax
    import jax.numpy as jnp

    from research.cond import Cond
    from research.models.cond_unet import CondUNet
    from research.models.controlnet import CondUNetControlNet, scale_residuals, sum_residuals

    unet = CondUNet(**dict(fields), dtype=_jnp_dtype(dtype))
    nets = tuple(CondUNetControlNet(**dict(f), dtype=_jnp_dtype(dtype)) for f in controls)

    def residuals(control_params, hints, scales, x, t, text, b):
        """diffusers' StableDiffusionControlNetPipeline: each ControlNet sees the U-Net's batch (both guidance
        halves); in guess mode with guidance only the conditional half, the unconditional half getting zeros,
        and the residuals are scaled by logspace(-1, 0, n + 1) (ratio 10 ** (-1 / n)) times the scale."""
        out = []
        for net, p, hint, scale in zip(nets, control_params, hints, scales):
            xs, texts, hs = x, text, hint
            if guided and not guess_mode:
                hs = jnp.concatenate([hint, hint])
            elif guided:
                xs, texts = x[b:], text[b:]
            r = net.apply({"params": p}, xs, jnp.full((xs.shape[0],), t, jnp.float32), Cond(text=texts, hint=hs))
            r = scale_residuals(r, scale, guess_mode, 10 ** (-1 / len(r["down"])))
            if guided and guess_mode:
                r = jax.tree.map(lambda a: jnp.concatenate([jnp.zeros_like(a), a]), r)
            out.append(r)
        return sum_residuals(out)

    def model_output(params, x, t, text, guidance, guidance_rescale, control_params, hints, scales):
        b = x.shape[0]
        inputs = jnp.concatenate([x, x]) if guided else x
        cond = Cond(text=text)
        if nets:
            cond = cond.replace(residuals=residuals(control_params, hints, scales, inputs, t, text, b))
        out = unet.apply({"params": params}, inputs, jnp.full((inputs.shape[0],), t, jnp.float32), cond)
        out = out.astype(jnp.float32)
        if not guided:
            return out
        uncond, cond = out[:b], out[b:]
        guided_out = uncond + guidance * (cond - uncond)
        if rescale:  # diffusers' rescale_noise_cfg (Lin et al. 2024), torch's unbiased std per example
            axes = tuple(range(1, x.ndim))
            std = lambda a: jnp.std(a, axis=axes, keepdims=True, ddof=1)
            ratio = std(cond) / std(guided_out)
            guided_out = guidance_rescale * guided_out * ratio + (1 - guidance_rescale) * guided_out
        return guided_out

    @jax.jit
    def run(params, x, text, plan, keys, guidance, guidance_rescale, control_params=(), hints=(), scales=()):
        def step(carry, row):
            x, prev_x0 = carry
            out = model_output(params, x, row["t"], text, guidance, guidance_rescale, control_params, hints, scales)
            noise = None
            if stochastic:
                noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, row["i"]), x.shape[1:]))(keys)
            return sampler_update(sampler, clip_range, row, x, out, prev_x0, noise), None

        (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), plan)
        return x

    return run


# --- the pipeline ----------------------------------------------------------------------------------------------------


def _as_list(texts, name: str) -> list:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise GenerateError(f"{name} must be strings")
    return texts


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x text-to-image from `SDPipelineParts` (research.pretrained.convert_sd), matching
    diffusers' StableDiffusionPipeline; see the module docstring for the numerics."""

    def __init__(self, parts, dtype: str = "float32"):
        import jax
        import jax.numpy as jnp

        if dtype not in DTYPES:
            raise GenerateError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        self.parts, self.dtype = parts, dtype
        put = lambda tree: jax.tree.map(jnp.asarray, tree)
        self.unet_params, self.text_params, self.vae_params = (
            put(parts.unet_params),
            put(parts.text_params),
            put(parts.vae_params),
        )
        self.tokenizer = _tokenizer(parts.tokenizer_folder)
        limit = getattr(self.tokenizer, "model_max_length", None) or parts.text_fields["context_length"]
        self.context_length = int(min(parts.text_fields["context_length"], limit))
        self.vae_factor = 2 ** (len(parts.vae_fields["ch_mult"]) - 1)
        self.latent_channels = int(parts.unet_fields["in_channels"])
        self.size_multiple = self.vae_factor * 2 ** (len(parts.unet_fields["block_out_channels"]) - 1)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: str = "float32") -> "StableDiffusion":
        """From a diffusers StableDiffusionPipeline folder, or a workdir converted from one
        (research.pretrained.sd_workdir, also after fine-tuning it as a text_to_image run)."""
        from research.pretrained.convert_sd import read_diffusers_pipeline
        from research.pretrained.sd_workdir import is_sd_workdir, read_sd_workdir

        if is_sd_workdir(folder):
            return cls(read_sd_workdir(folder), dtype)
        return cls(read_diffusers_pipeline(folder), dtype)

    @property
    def default_size(self) -> int:
        """diffusers' default height and width: unet sample_size * vae scale factor (512 for SD 1.5)."""
        return self.parts.unet_sample_size * self.vae_factor

    # text

    def tokenize(self, texts, *, what: str = "prompt") -> np.ndarray:
        """int32 [N, 77]: diffusers' tokenizer(texts, padding='max_length', max_length=77, truncation=True). An
        over-long text is cut to its first 75 tokens with a UserWarning naming how many were dropped."""
        from research.data.text import tokenize

        texts = _as_list(texts, what + "s")
        keep = self.context_length - 2
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        for i, (text, length) in enumerate(zip(texts, lengths)):
            if length > keep:
                short = text if len(text) <= 60 else text[:57] + "..."
                warnings.warn(
                    f"{what} {i} ({short!r}) has {length} tokens but the text encoder reads {keep} (plus start and "
                    f"end): truncated, {length - keep} tokens dropped",
                    UserWarning,
                    stacklevel=2,
                )
        return tokenize(self.tokenizer, texts, self.context_length)

    def encode_tokens(self, tokens: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
        """float32 [N, L, D] text-encoder hidden states SD conditions on, for int tokens [N, L]."""
        import jax

        tokens = np.asarray(tokens, np.int32)
        encode = _text_program(_frozen(self.parts.text_fields), self.dtype, self.parts.text_output_layer)
        if batch_size is None or batch_size >= len(tokens):
            return np.asarray(jax.device_get(encode(self.text_params, tokens)))
        out = [encode(self.text_params, chunk) for chunk in _batches(tokens, batch_size)]
        return np.concatenate([np.asarray(o) for o in out])[: len(tokens)]

    def encode_prompts(self, prompts, negative_prompts=None):
        """(cond, uncond), float32 [N, L, D] each: the prompts' hidden states and the negative prompts' ('' when
        None: the unconditional text). negative_prompts: None, one string for all, or one per prompt."""
        prompts = _as_list(prompts, "prompts")
        negative = _negatives(negative_prompts, len(prompts))
        cond = self.encode_tokens(self.tokenize(prompts))
        uncond = self.encode_tokens(self.tokenize(negative, what="negative prompt"))
        return cond, uncond

    # sampling

    def initial_latents(self, n: int, height: int, width: int, seed: int) -> np.ndarray:
        """float32 [n, height / f, width / f, c]: image j's noise is normal(fold_in(PRNGKey(seed), j))."""
        import jax

        shape = (height // self.vae_factor, width // self.vae_factor, self.latent_channels)
        key = jax.random.PRNGKey(seed)
        draw = jax.jit(jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), shape)))
        return np.asarray(draw(np.arange(n)))

    def check_size(self, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if value < self.size_multiple or value % self.size_multiple:
                raise GenerateError(
                    f"--{name} {value}: must be a positive multiple of {self.size_multiple} (VAE factor "
                    f"{self.vae_factor} times the U-Net's {self.size_multiple // self.vae_factor}x downsampling)"
                )

    def as_nhwc_latents(self, latents, n: int, height: Optional[int], width: Optional[int]) -> np.ndarray:
        """latents [n, c, h, w] (diffusers) or [n, h, w, c] -> float32 NHWC; GenerateError on any other shape."""
        latents = np.asarray(latents, np.float32)
        c = self.latent_channels
        want = None if height is None else (height // self.vae_factor, width // self.vae_factor)
        if latents.ndim == 4 and latents.shape[1] == c and (want is None or latents.shape[2:] == want):
            latents = latents.transpose(0, 2, 3, 1)
        elif not (latents.ndim == 4 and latents.shape[3] == c and (want is None or latents.shape[1:3] == want)):
            sides = "H/8, W/8" if want is None else f"{want[0]}, {want[1]}"
            raise GenerateError(
                f"latents have shape {latents.shape}; expected [{n}, {c}, {sides}] (NCHW, as diffusers) or "
                f"[{n}, {sides}, {c}] (NHWC)"
            )
        if latents.shape[0] != n:
            raise GenerateError(f"latents hold {latents.shape[0]} images but {n} are requested (prompts x --num)")
        if not np.isfinite(latents).all():
            raise GenerateError("latents contain NaN or infinity")
        return latents

    def generate(
        self,
        prompts,
        negative_prompts=None,
        *,
        steps: int = 25,
        guidance: float = 7.5,
        sampler: str = "dpmpp_2m",
        eta: float = 0.0,
        seed: int = 0,
        latents=None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        batch_size: Optional[int] = None,
        guidance_rescale: float = 0.0,
        progress: bool = False,
        controlnets=(),
        hints=(),
        control_scales=(),
        guess_mode: bool = False,
    ) -> np.ndarray:
        """Images float32 [N, H, W, 3] in [0, 1], one per prompt (N = len(prompts)).

        controlnets: ControlNets as (fields, params) from research.pretrained.convert_controlnet, each with its hint
        in hints (float [H, W, 3] in [0, 1] for every image, or [N, H, W, 3]; diffusers' control image after its
        processor) and its conditioning scale in control_scales (default 1.0 each); guess_mode as diffusers'
        (control on the conditional half only, residuals scaled by logspace(-1, 0)).

        latents: the initial noise, [N, 4, H/8, W/8] (diffusers' NCHW) or [N, H/8, W/8, 4]; when given, height and
        width default to its size; otherwise it is drawn from `seed` (see initial_latents) at height x width
        (default: default_size). batch_size: images per U-Net call (default min(N, 8)); the programs compile once
        per batch size."""
        import jax
        import jax.numpy as jnp
        from tqdm.auto import tqdm

        prompts = _as_list(prompts, "prompts")
        n = len(prompts)
        if n == 0:
            raise GenerateError("no prompts given")
        negative = _negatives(negative_prompts, n)
        plan = sampling_plan(self.parts.scheduler_config, sampler, steps, eta)
        if not math.isfinite(guidance):
            raise GenerateError(f"guidance {guidance} is not a finite number")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise GenerateError(f"guidance_rescale {guidance_rescale}: give a value in [0, 1]")
        if latents is not None:
            both = height is not None and width is not None
            latents = self.as_nhwc_latents(latents, n, height if both else None, width if both else None)
            size = (latents.shape[1] * self.vae_factor, latents.shape[2] * self.vae_factor)
            height, width = height or size[0], width or size[1]
            if (height, width) != size:
                raise GenerateError(
                    f"latents of shape {latents.shape} (NHWC) are for {size[0]}x{size[1]} images, not {height}x{width}"
                )
        height, width = int(height or self.default_size), int(width or self.default_size)
        self.check_size(height, width)
        if latents is None:
            latents = self.initial_latents(n, height, width, seed)
        latents = latents * np.float32(plan.init_noise_sigma)
        batch = int(batch_size or min(n, 8))
        if batch < 1:
            raise GenerateError(f"batch size {batch}: give at least 1")

        guided = guidance != 1.0
        stochastic = bool(np.any(plan.noise_std > 0))
        rescale = guided and guidance_rescale > 0
        controls = self.check_controls(controlnets, hints, control_scales, n, height, width)
        run = _loop_program(
            _frozen(self.parts.unet_fields),
            self.dtype,
            plan.sampler,
            guided,
            stochastic,
            plan.clip_range,
            rescale,
            tuple(_frozen(f) for f, _, _, _ in controls),
            bool(guess_mode) and bool(controls),
        )
        control_params = tuple(jax.tree.map(jnp.asarray, p) for _, p, _, _ in controls)
        scales = tuple(jnp.float32(s) for _, _, _, s in controls)
        decode = _vae_program(_frozen(self.parts.vae_fields), self.dtype)
        rows = {
            "t": jnp.asarray(plan.timesteps, jnp.float32),
            "i": jnp.arange(len(plan.timesteps)),
            **{k: jnp.asarray(getattr(plan, k)) for k in _PLAN_ROWS},
        }
        tokens = self.tokenize(prompts)
        neg_tokens = self.tokenize(negative, what="negative prompt") if guided else None
        root = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # the noise of eta > 0; 0 would reuse the init key
        images = []
        starts = range(0, n, batch)
        for start in tqdm(starts, desc="generate", unit="batch", disable=not progress, leave=False):
            idx = np.minimum(np.arange(start, start + batch), n - 1)  # the last batch repeats its final image
            text = self.encode_tokens(tokens[idx])
            if guided:
                text = np.concatenate([self.encode_tokens(neg_tokens[idx]), text])
            keys = jax.vmap(lambda j: jax.random.fold_in(root, j))(jnp.asarray(idx))
            z = run(
                self.unet_params,
                jnp.asarray(latents[idx]),
                jnp.asarray(text),
                rows,
                keys,
                jnp.float32(guidance),
                jnp.float32(guidance_rescale),
                control_params,
                tuple(jnp.asarray(h[idx]) for _, _, h, _ in controls),
                scales,
            )
            pixels = decode(self.vae_params, z, jnp.float32(self.parts.scaling_factor))
            images.append(np.asarray(jax.device_get(pixels))[: n - start])
        return np.concatenate(images)[:n]

    def check_controls(self, controlnets, hints, scales, n: int, height: int, width: int) -> list:
        """[(fields, params, hints [n, H, W, c] float32, scale)] of the ControlNets, each checked against the U-Net
        and the image size (GenerateError naming the mismatch)."""
        controlnets, hints = list(controlnets), list(hints)
        scales = [1.0] * len(controlnets) if not scales else [float(s) for s in scales]
        if not (len(controlnets) == len(hints) == len(scales)):
            raise GenerateError(
                f"{len(controlnets)} ControlNets, {len(hints)} hints and {len(scales)} control scales: give one hint "
                f"(and optionally one scale) per ControlNet"
            )
        out = []
        unet = self.parts.unet_fields
        for i, ((fields, params), hint, scale) in enumerate(zip(controlnets, hints, scales)):
            for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels"):
                if tuple(np.atleast_1d(fields[key])) != tuple(np.atleast_1d(unet[key])):
                    raise GenerateError(
                        f"ControlNet {i}: {key}={fields[key]} but the U-Net has {unet[key]}; a ControlNet controls "
                        f"the U-Net architecture it was trained on"
                    )
            if not math.isfinite(scale):
                raise GenerateError(f"control scale {scale} is not a finite number")
            hint = np.asarray(hint, np.float32)
            hint = np.broadcast_to(hint, (n, *hint.shape)) if hint.ndim == 3 else hint
            channels = int(fields.get("conditioning_channels") or hint.shape[-1])
            if hint.shape != (n, height, width, channels):
                raise GenerateError(
                    f"hint {i} has shape {tuple(hint.shape)}; it must be [{height}, {width}, {channels}] (one for "
                    f"every image) or [{n}, {height}, {width}, {channels}], the image size, values in [0, 1]"
                )
            if int(fields["hint_downsample"]) != self.vae_factor:
                raise GenerateError(
                    f"ControlNet {i} encodes hints {fields['hint_downsample']}x down but the VAE's latents are "
                    f"{self.vae_factor}x smaller than the images"
                )
            out.append((fields, params, np.ascontiguousarray(hint), scale))
        return out


def read_hint(path: str, height: int, width: int) -> np.ndarray:
    """A hint image file -> float32 [height, width, 3] in [0, 1], as diffusers' control image processor makes it
    (RGB, resized with Lanczos when its size differs, no normalisation to [-1, 1])."""
    from PIL import Image

    if not os.path.isfile(path):
        raise GenerateError(f"--hint {path} does not exist")
    try:
        image = Image.open(path).convert("RGB")
    except OSError as e:
        raise GenerateError(f"--hint {path} is not a readable image ({e})") from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return np.asarray(image, np.float32) / 255.0


_PLAN_ROWS = ("x0_x", "x0_out", "eps_x", "eps_out", "next_x", "next_x0", "next_eps", "next_d1", "noise_std")


def _batches(array: np.ndarray, size: int):
    for start in range(0, len(array), size):
        chunk = array[start : start + size]
        if len(chunk) < size:  # keep one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), 0)])
        yield chunk


def _negatives(negative_prompts, n: int) -> list:
    if negative_prompts is None:
        return [""] * n
    negative = _as_list(negative_prompts, "negative prompts")
    if len(negative) == 1:
        return negative * n
    if len(negative) != n:
        raise GenerateError(f"{len(negative)} negative prompts for {n} prompts; give one for all or one per prompt")
    return negative


@functools.lru_cache(maxsize=None)
def _tokenizer(folder: str):
    from research.data.text import load_tokenizer

    return load_tokenizer(folder)  # vocab.json + merges.txt, or a transformers 5 folder with tokenizer.json only


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] floats in [0, 1] -> uint8, as diffusers' numpy_to_pil: round(255 x)."""
    return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


def write_samples(out: str, images: np.ndarray, prompts, negative_prompts, meta: Dict[str, Any]) -> str:
    """OUT/{i:05d}.png per image and OUT/samples.npz (images uint8, prompts, negative_prompts, meta); -> npz path."""
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    pixels = to_uint8(images)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(os.path.join(out, f"{i:05d}.png"))
    path = os.path.join(out, "samples.npz")
    np.savez(
        path,
        images=pixels,
        prompts=np.asarray(list(prompts), dtype=str),
        negative_prompts=np.asarray(list(negative_prompts), dtype=str),
        **{k: np.asarray(v) for k, v in meta.items()},
    )
    return path


# --- command line ----------------------------------------------------------------------------------------------------


def _read_prompts(path: str) -> list:
    if not os.path.isfile(path):
        raise GenerateError(f"--prompts {path} does not exist (give a text file with one prompt per line)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise GenerateError(f"--prompts {path} holds no prompt (one per line; blank lines are skipped)")
    return prompts


def _read_latents(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise GenerateError(f"--latents {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise GenerateError(f"--latents {path} is not a readable .npy array ({e})") from None


def _is_training_run(folder: str) -> bool:
    """A workdir of this codebase (config.json with a task), not a diffusers folder (config.json with _class_name)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return "task" in json.load(f)
    except (OSError, ValueError):
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    from research.cli import ArgumentParser, UsageError, fail, nonnegative_int, positive_int
    from research.pretrained.convert_clip import ConversionError

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pretrained", required=True, help="diffusers StableDiffusionPipeline folder, or a workdir converted from one"
    )
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", action="append", default=None, help="once for all prompts, or per prompt")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale s = 1 + w (diffusers; 1: none)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="diffusers' guidance_rescale in [0, 1]")
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--sampler", choices=SAMPLERS, default="dpmpp_2m")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--num", type=positive_int, default=4, help="images per prompt")
    p.add_argument("--height", type=positive_int, default=None, help="default: unet sample_size * 8")
    p.add_argument("--width", type=positive_int, default=None, help="default: unet sample_size * 8")
    p.add_argument("--latents", default=None, help=".npy initial noise, [N, 4, H/8, W/8] (NCHW) or NHWC")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per U-Net call (x2 with guidance)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--out", required=True, help="folder for the PNGs and samples.npz")
    p.add_argument("--controlnet", action="append", default=[], help="diffusers ControlNetModel folder (repeatable)")
    p.add_argument("--hint", action="append", default=[], help="the control image of each --controlnet, in order")
    p.add_argument("--control-scale", action="append", type=float, default=[], help="per --controlnet (default 1)")
    p.add_argument("--guess-mode", action="store_true", help="diffusers' guess_mode for the ControlNets")
    try:
        args = p.parse_args(argv)
        if (args.prompt is None) == (args.prompts is None):
            raise UsageError("give the prompts with --prompt TEXT (repeatable) or --prompts FILE (not both)")
        if not os.path.isdir(args.pretrained):
            raise UsageError(f"--pretrained {args.pretrained} is not a folder (give a StableDiffusionPipeline folder)")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is a file; give a folder")
        if not math.isfinite(args.guidance):
            raise UsageError(f"--guidance {args.guidance} is not a finite number")
        if len(args.hint) != len(args.controlnet) or len(args.control_scale) not in (0, len(args.controlnet)):
            raise UsageError(
                f"{len(args.controlnet)} --controlnet, {len(args.hint)} --hint and {len(args.control_scale)} "
                f"--control-scale: give one --hint (and optionally one --control-scale) per --controlnet"
            )
        for folder in args.controlnet:
            if _is_training_run(folder):
                raise UsageError(
                    f"--controlnet {folder} is a training run of this codebase: those control pixel-space U-Nets "
                    f"(task='controlnet'); sample it with python -m research.sample --workdir {folder}"
                )
            if not os.path.isdir(folder):
                raise UsageError(f"--controlnet {folder} is not a folder (give a diffusers ControlNetModel folder)")
    except UsageError as e:
        return fail(e)
    try:
        started = time.time()
        base = args.prompt if args.prompt is not None else _read_prompts(args.prompts)
        negative = _negatives(args.negative_prompt, len(base))
        prompts = [text for text in base for _ in range(args.num)]
        negatives = [text for text in negative for _ in range(args.num)]
        latents = _read_latents(args.latents) if args.latents else None
        sampling_plan({}, args.sampler, 1, args.eta)  # flag errors before the weights are read
        sd = StableDiffusion.from_pretrained(args.pretrained, args.dtype)
        controlnets, hints = [], []
        if args.controlnet:
            from research.pretrained.convert_controlnet import load_diffusers_controlnet

            size = (args.height or sd.default_size, args.width or sd.default_size)
            if latents is not None and (args.height is None or args.width is None):
                z = sd.as_nhwc_latents(latents, len(prompts), None, None)
                size = (z.shape[1] * sd.vae_factor, z.shape[2] * sd.vae_factor)
            controlnets = [load_diffusers_controlnet(folder) for folder in args.controlnet]
            hints = [read_hint(path, *size) for path in args.hint]
        images = sd.generate(
            prompts,
            negatives,
            steps=args.steps,
            guidance=args.guidance,
            sampler=args.sampler,
            eta=args.eta,
            seed=args.seed,
            latents=latents,
            height=args.height,
            width=args.width,
            batch_size=args.batch_size,
            guidance_rescale=args.guidance_rescale,
            progress=True,
            controlnets=controlnets,
            hints=hints,
            control_scales=args.control_scale,
            guess_mode=args.guess_mode,
        )
    except (GenerateError, ConversionError, OSError) as e:
        return fail(e)
    from research.pretrained.convert_sd import describe

    meta = dict(
        seed=args.seed,
        guidance=args.guidance,
        guidance_rescale=args.guidance_rescale,
        steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        height=images.shape[1],
        width=images.shape[2],
        dtype=args.dtype,
        latents=os.path.abspath(args.latents) if args.latents else "",
        pretrained=os.path.abspath(args.pretrained),
        sha256=json.dumps(describe(sd.parts)["sha256"], sort_keys=True),
        controlnets=json.dumps([os.path.abspath(c) for c in args.controlnet]),
        hints=json.dumps([os.path.abspath(h) for h in args.hint]),
        control_scales=json.dumps(args.control_scale or [1.0] * len(args.controlnet)),
        guess_mode=args.guess_mode,
    )
    path = write_samples(args.out, images, prompts, negatives, meta)
    print(
        f"wrote {len(images)} images ({images.shape[1]}x{images.shape[2]}, {args.sampler}, {args.steps} steps, "
        f"guidance {args.guidance:g}) to {args.out}: PNGs and {path} in {time.time() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
