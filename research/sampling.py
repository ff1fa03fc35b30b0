"""Turn a trained model into samples: schedule from the config, optional respacing, batched and jitted."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from research.cond import Cond
from research.diffusion import samplers
from research.diffusion.classifier_guidance import classifier_guided_denoiser, log_prob_from_logits, log_prob_grad
from research.diffusion.guidance import guided_denoiser
from research.diffusion.schedules import Schedule, make_schedule, respace, space_timesteps
from research.shapes import latent_enabled, model_input_shape


def make_denoiser(model, params):
    """The sampler/likelihood contract denoise(x_t, t, cond) -> model output, in inference mode."""

    def denoise(x_t, t, cond):
        return model.apply({"params": params}, x_t, t, cond, train=False)

    return denoise


def schedule_from_config(diffusion_config) -> Schedule:
    return make_schedule(
        diffusion_config.schedule,
        diffusion_config.timesteps,
        beta_start=diffusion_config.beta_start,
        beta_end=diffusion_config.beta_end,
    )


def parse_steps(steps: Union[int, str]):
    """'50' -> 50; 'ddim50' stays; '0,10,20' -> [0, 10, 20]."""
    if isinstance(steps, int):
        return steps
    text = str(steps).strip()
    if text.isdigit():
        return int(text)
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return text


def sampling_schedule(base: Schedule, steps) -> Schedule:
    steps = parse_steps(steps)
    if steps == base.num_steps:
        return base
    return respace(base, space_timesteps(base.num_steps, steps))


def to_uint8(x, centered: bool = True) -> np.ndarray:
    x = np.asarray(x, np.float32)
    x = (x + 1.0) * 127.5 if centered else x * 255.0
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class TextConditioner:
    """Prompts as the condition of a text-conditional run (task 'text_to_image'), for Generator.

    The labels passed to Generator.generate index the prompts: example i is conditioned on tokens[labels[i]]
    [L] int32 and its unconditional branch on null_tokens [L] (the empty prompt's tokens, the condition that
    prompt dropout trains). encode(params, tokens [B, L]) -> Cond runs the text encoder inside the sampler's
    compiled program, once per batch before the denoising loop; params (the encoder's) travel as an argument,
    not as constants of the program."""

    encode: Callable
    params: Any
    tokens: np.ndarray
    null_tokens: np.ndarray

    @property
    def num_prompts(self) -> int:
        return int(len(self.tokens))


class Generator:
    """Compiles one sampler for a fixed batch shape, then draws any number of samples in batches.

    Batch b uses key fold_in(PRNGKey(seed), b), so a result depends only on (seed, batch size), not on how
    many batches were requested.
    """

    def __init__(
        self,
        model,
        config,
        *,
        sampler: Optional[str] = None,
        steps=None,
        eta: Optional[float] = None,
        batch_size: Optional[int] = None,
        clip_x0: Optional[bool] = None,
        autoencoder=None,
        guidance: Optional[float] = None,
        guidance_rescale: float = 0.0,
        grid: Optional[str] = None,
        classifier=None,
        text: Optional[TextConditioner] = None,
    ):
        """guidance: classifier-free guidance scale in diffusers' sense, s = 1 + w (1 or None: no guidance); needs
        a class-conditional model trained with condition dropout (model.null_label), or prompts (text) whose empty
        prompt is the null condition.
        text: the prompts of a text-conditional model (TextConditioner); labels then index them.
        guidance_rescale: diffusers' guidance_rescale (std matching of the guided prediction, 0 disables).
        classifier: (model, params, scale) of a noise-aware classifier (task 'noisy_classifier', trained on this
        run's schedule) for classifier guidance (Dhariwal & Nichol 2021, the eps-shift form, every sampler): eps is
        shifted by -sqrt(1 - abar) * scale * grad_x log p(y | x_t); scale 0 or None disables. The classes y are the
        labels passed to generate (default: 0, 1, ..., K-1 cycling), also for an unconditional diffusion model."""
        s = config.sample
        self.config = config
        self.sampler = sampler or s.sampler
        self.eta = s.eta if eta is None else eta
        self.batch_size = batch_size or s.batch_size
        steps = s.steps if steps is None else steps
        full = schedule_from_config(config.diffusion)
        count = parse_steps(steps)
        solver = self.sampler not in ("ddpm", "ddim")
        kwargs = {}
        if solver and isinstance(count, int):
            # The solvers build their own N-step grid on the training schedule (diffusers' grids), uniform in t,
            # in log-SNR or Karras' sigmas (sample.grid); an explicit timestep list runs on the respaced schedule.
            self.schedule, self.num_steps = full, count
            kwargs.update(steps=count, grid=grid or s.grid)
        else:
            self.schedule = sampling_schedule(full, steps)
            self.num_steps = self.schedule.num_steps
        self.text = text
        self.conditional = bool(config.model.get("num_classes", 0)) or text is not None
        shape = (self.batch_size, *model_input_shape(config))
        # Latent diffusion: samples are drawn in latent space and decoded by the run's autoencoder (the trainer
        # passes the one it already holds).
        self.autoencoder = autoencoder
        if autoencoder is None and latent_enabled(config):
            from research.latents import load_run_autoencoder

            self.autoencoder = load_run_autoencoder(config)
        kwargs.update(prediction=config.diffusion.prediction, clip_x0=s.clip_x0 if clip_x0 is None else clip_x0)
        if self.sampler == "ddim":
            kwargs["eta"] = self.eta
            if config.diffusion.var_type == "learned_range":
                kwargs["var_type"] = "learned_range"
        else:
            kwargs["var_type"] = config.diffusion.var_type
        schedule, name = self.schedule, self.sampler
        self.guidance = None if guidance is None or float(guidance) == 1.0 else float(guidance)
        if self.guidance is not None and text is None:
            if not self.conditional or not config.model.get("null_label", False):
                raise ValueError(
                    "classifier-free guidance needs a class-conditional model trained with condition dropout "
                    "(model.num_classes > 0, model.null_label=True, diffusion.cond_drop_prob > 0); this run has none"
                )
        if self.guidance is not None and not self.guidance >= 0:
            raise ValueError(f"the guidance scale must be >= 0 (1: no guidance), got {guidance}")
        null_label, channels = int(config.model.get("num_classes", 0)), shape[-1]
        clf_model, self._classifier_params, clf_scale = classifier if classifier is not None else (None, None, None)
        self.classifier_scale = None if clf_scale is None or float(clf_scale) == 0.0 else float(clf_scale)
        if self.classifier_scale is not None:
            if not np.isfinite(self.classifier_scale) or self.classifier_scale < 0:
                raise ValueError(f"the classifier guidance scale must be >= 0 (0: none), got {clf_scale}")
            self.classifier_classes = int(clf_model.num_classes)
        conditional = self.conditional

        def denoiser(params, labels, clf_params, null=None, hint=None):
            base = make_denoiser(model, params)
            if not conditional:
                # Labels travel in cond for a classifier only; an unconditional network gets none (but its hint).
                unconditional = base
                base = lambda x_t, t, cond: unconditional(x_t, t, None if hint is None else Cond(hint=hint))  # noqa: E731
            if self.guidance is not None:
                null = Cond(label=jnp.full_like(labels, null_label)) if null is None else null
                null = null if hint is None else null.replace(hint=hint)  # the control acts in both branches
                base = guided_denoiser(
                    base,
                    null,
                    scale=self.guidance,
                    prediction=config.diffusion.prediction,
                    schedule=schedule,
                    channels=channels,
                    rescale=guidance_rescale,
                )
            if self.classifier_scale is None:
                return base
            logits = lambda x_t, t: clf_model.apply({"params": clf_params}, x_t, t, None, train=False)  # noqa: E731
            return classifier_guided_denoiser(
                base,
                log_prob_grad(log_prob_from_logits(logits)),
                schedule,
                self.classifier_scale,
                config.diffusion.prediction,
            )

        def run(params, key, labels, clf_params=None, text_params=None, tokens=None, null_tokens=None, hint=None):
            cond, null = None if labels is None else Cond(label=labels), None
            if text is not None:
                cond = text.encode(text_params, tokens[labels])
                if self.guidance is not None:
                    null = text.encode(text_params, jnp.broadcast_to(null_tokens, (labels.shape[0], null_tokens.size)))
            if hint is not None:
                cond = Cond(hint=hint) if cond is None else cond.replace(hint=hint)
            denoise = denoiser(params, labels, clf_params, null, hint)
            return samplers.sample(name, denoise, schedule, key, shape, cond=cond, **kwargs)

        self._run = jax.jit(run)

    def generate(
        self,
        params,
        num: int,
        seed: int = 0,
        labels: Optional[np.ndarray] = None,
        progress: bool = True,
        hints: Optional[np.ndarray] = None,
    ):
        """-> (samples float32 [num, H, W, C] in model range, labels or None, NFE per sample); a latent diffusion
        run's samples are decoded to pixels. hints [num, h, w, c] (a tuple of such arrays for several ControlNets)
        become cond.hint, one per sample, for a ControlNet-controlled model (research.models.controlnet)."""
        if hints is not None:
            many = isinstance(hints, (tuple, list))
            for h in hints if many else (hints,):
                if len(h) < num:
                    raise ValueError(f"{len(h)} hints for {num} samples; give one hint per sample")
        if self.text is not None and labels is None:
            labels = np.arange(num) % self.text.num_prompts
        elif self.conditional and labels is None:
            labels = np.arange(num) % self.config.model.num_classes
        if self.classifier_scale is not None and labels is None:
            labels = np.arange(num) % self.classifier_classes
        base = jax.random.PRNGKey(seed)
        out, nfe = [], None
        batches = math.ceil(num / self.batch_size)
        for b in tqdm(
            range(batches), desc=f"{self.sampler} {self.num_steps} steps", disable=not progress or batches == 1
        ):
            lab = None
            if labels is not None:
                chunk = np.asarray(labels[b * self.batch_size : (b + 1) * self.batch_size], np.int32)
                lab = jnp.asarray(np.resize(chunk, self.batch_size))  # pad the last batch by repetition
            text = self.text
            prompts = () if text is None else (text.params, jnp.asarray(text.tokens), jnp.asarray(text.null_tokens))
            hint = None
            if hints is not None:
                rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
                pad = lambda h: jnp.asarray(np.resize(np.asarray(h[rows], np.float32), (self.batch_size, *h.shape[1:])))  # noqa: E731
                hint = tuple(pad(h) for h in hints) if many else pad(hints)
            result = self._run(params, jax.random.fold_in(base, b), lab, self._classifier_params, *prompts, hint=hint)
            samples = result.samples
            if self.autoencoder is not None:
                samples = self.autoencoder.decode_latents(samples)
            out.append(np.asarray(samples))
            nfe = int(result.nfe)
        samples = np.concatenate(out)[:num]
        return samples, (None if labels is None else np.asarray(labels[:num])), nfe
