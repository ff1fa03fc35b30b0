"""Config files, command-line overrides and start-up validation.

A config file is a Python file with `get_config()` returning an ml_collections.ConfigDict built on
`base_config()`, whose keys are locked: a misspelt key fails when it is set, with a suggestion.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Iterable, List, Sequence, Tuple

import ml_collections


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key and the fix."""


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with defaults; experiment files override values, never add keys."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "diffusion"  # a registered task (research/tasks/): diffusion | autoencoder | fewstep | text_to_image | ...

    c.data = ml_collections.ConfigDict(
        dict(
            name="digits",  # digits | mnist | fashion_mnist | mnist_fashion (both, 20 classes) | cifar10 | tfds |
            # imagefolder | synthetic
            data_dir="",  # '' -> $RESEARCH_DATA_DIR/<name> for file-based sets
            tfds_name="",  # with name='tfds'
            caption_key="",  # image-caption data: imagefolder's caption column ('' -> text); TFDS: the text
            # feature, '/' for nesting (coco_captions: captions/text, the first of each image's captions)
            image_size=8,
            channels=1,
            num_classes=10,
            random_flip=False,
            centered=True,  # scale pixels to [-1, 1] (False: [0, 1])
            num_threads=0,  # grain read threads; 0 reads in the training thread
            num_examples=0,  # synthetic only: dataset size (0 -> 10,000)
            synthetic_seed=0,  # synthetic only
        )
    )

    # U-Net defaults; a config for another backbone replaces config.model with its own fields.
    c.model = ml_collections.ConfigDict(
        dict(
            name="unet",
            ch=128,
            ch_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attn_resolutions=(16,),
            num_heads=1,
            head_channels=-1,
            dropout=0.1,
            use_scale_shift_norm=False,
            resamp_with_conv=True,
            num_classes=0,
            null_label=False,  # an extra label embedding row (index num_classes) for classifier-free guidance
            norm_groups=32,
            norm_eps=1e-6,
            dtype="float32",  # compute dtype: float32 | bfloat16 | float16 (parameters and optimizer stay float32)
            remat="none",  # per-block rematerialisation: none | full | dots (research/models/layers.py)
        )
    )

    c.diffusion = ml_collections.ConfigDict(
        dict(
            schedule="linear",  # linear | scaled_linear | cosine | sigmoid
            timesteps=1000,
            beta_start=1e-4,
            beta_end=0.02,
            prediction="eps",  # eps | x0 | v
            var_type="fixed_small",  # fixed_small | fixed_large | learned_range
            loss="simple",  # simple | hybrid (simple + vlb_weight * L_vlb, iDDPM) | vlb
            vlb_weight=0.001,  # lambda of L_hybrid
            t_sampling="uniform",  # uniform | importance (loss-aware sampling of t for L_vlb, iDDPM Sec. 3.3)
            cond_drop_prob=0.0,  # classifier-free guidance training: each example's condition is replaced by the
            # null condition with this probability (needs model.null_label)
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            optimizer="adam",  # adam | adamw
            lr=2e-4,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            decay_matrices_only=False,  # adamw: decay only parameters with 2+ dimensions (CLIP: no gains, biases)
            warmup_steps=5000,
            lr_schedule="constant",  # constant | cosine | linear (both decay to 0 at train.num_steps)
            grad_clip=1.0,  # global-norm clip; 0 disables
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            batch_size=128,  # global, over all devices and hosts
            num_steps=800_000,
            ema_decay=0.9999,
            ema_warmup=False,  # decay min(ema_decay, (1+k)/(10+k)); off in the paper recipes
            log_every=100,
            ckpt_every=5000,
            keep_checkpoints=3,
            # Fine-tuning: a new run starts from the parameters (and EMA) of another run's checkpoint, every
            # trainable part by name, shapes checked; the optimizer starts fresh. '' starts from the initialisation.
            init_from="",
            init_from_step=0,  # its checkpoint step; 0 takes the newest
            sample_every=10_000,  # 0 disables sample grids during training
            mesh_model=1,  # size of the parameter-sharding mesh axis ('model'); the rest is 'data'
            num_devices=0,  # devices of the mesh: 0 takes all; N > 0 the first N (one process only)
            sharding_rules=(),  # ((regex, rule), ...) on state key paths: replicate | fsdp | model:K | fsdp+model:K
            # (research/train/mesh.py); (('.*', 'fsdp'),) is FSDP; () keeps the default
            fsdp_min_size=2**18,  # leaves with fewer elements stay replicated under 'fsdp'
            # Gradient accumulation: the batch is split into grad_accum microbatches whose gradients are averaged
            # in one compiled step (less activation memory, the same update; research/train/grads.py).
            grad_accum=1,
            # Dynamic loss scaling: auto (on when model.dtype='float16') | dynamic | off. Steps with non-finite
            # gradients are skipped and the scale halved; it doubles after 2000 finite steps.
            loss_scale="auto",
            progress=True,
            tensorboard=True,  # also write the logged scalars and preview grids to WORKDIR/tensorboard (tensorboardX)
            # Learning curve of sample quality: every fid_every steps (a multiple of ckpt_every; 0: off), the
            # domain-classifier FID of fid_num samples of the saved checkpoint (the run's sample settings) against
            # the training split, appended to WORKDIR/fid.jsonl and to TensorBoard (eval/fid_domain).
            fid_every=0,
            fid_num=1000,
        )
    )

    c.sample = ml_collections.ConfigDict(
        dict(
            sampler="ddim",  # ddim | ddpm | dpm++2m | dpm++3m | dpm++2s | unipc
            steps="50",  # count (evenly spaced), "ddimN" (DDIM stride), or "t1,t2,..." timesteps
            eta=0.0,
            grid="uniform",  # the solvers' time grid for a step count: uniform (diffusers' linspace) | logsnr | karras
            num=64,
            batch_size=256,
            clip_x0=True,
            use_ema=True,
        )
    )

    # task='autoencoder' (Rombach et al. 2022, LDM's AutoencoderKL). As in LDM, the reconstruction loss is summed
    # over pixels and the KL over latent dimensions per example, both averaged over the batch, so kl_weight has
    # the meaning of LDM's configs. The training-step grid shows sample.num test images over their reconstructions.
    c.autoencoder = ml_collections.ConfigDict(
        dict(
            recon_loss="l1",  # l1 | l2
            kl_weight=1e-6,
            disc_weight=0.0,  # weight of the hinge GAN loss; 0 builds no discriminator at all
            disc_start=50_001,  # step from which the discriminator trains and its loss is applied (LDM: 50001)
            adaptive_disc_weight=True,  # LDM: scale by |grad rec| / |grad gan| at the decoder's last layer
            disc_lr=4.5e-6,  # Adam with betas (disc_b1, disc_b2), constant rate
            disc_b1=0.5,
            disc_b2=0.9,
            disc_ch=64,
            disc_layers=3,  # stride-2 convs; the logit map is (H / 2**disc_layers)^2
            disc_norm_groups=32,
            scale_num_images=1024,  # training images whose encoded latents set latent_scale = 1 / std
        )
    )

    # task='fewstep' (research/tasks/fewstep.py): a few-step student from a teacher checkpoint (pd, cd) or from
    # scratch (ct). model / diffusion / data must match the teacher's (checked at init). The student's sampling
    # parameters are a separate EMA with train.ema_decay (sample.use_ema picks it, as for diffusion runs).
    c.fewstep = ml_collections.ConfigDict(
        dict(
            method="pd",  # pd (Salimans & Ho 2022) | cd (consistency distillation) | ct (consistency training) |
            # add (adversarial diffusion distillation, the c.add section)
            teacher_workdir="",  # pd, cd: workdir of a task='diffusion' run
            teacher_step=-1,  # its checkpoint step; -1 takes the newest
            teacher_use_ema=True,  # distil the teacher's EMA parameters
            # Progressive distillation: rounds halve pd_start_steps down to pd_final_steps; with T=1000 pd_start_steps
            # must divide into T so the trailing grids nest (512, 256, ... all work).
            pd_start_steps=512,  # the teacher's DDIM step count in round 0
            pd_final_steps=1,  # the last round's student step count
            pd_steps_per_round=50_000,  # optimizer steps per halving; train.num_steps must be rounds * this
            pd_weighting="truncated_snr",  # truncated_snr (the paper's max(SNR, 1)) | snr_plus_one | none
            pd_clip_x0=False,  # clip the teacher's x0 predictions to [-1, 1] inside the target's two DDIM steps
            # Consistency models (cd, ct): the discretisation is CM's Karras grid on [sigma_min, sigma_max] (cd clips it
            # to the teacher schedule's own range).
            sigma_min=0.002,
            sigma_max=80.0,
            rho=7.0,
            sigma_data=0.5,  # of the boundary-condition scalings c_skip, c_out
            solver="heun",  # cd: the teacher ODE step, euler | heun
            distance="l2",  # l2 (mean squared) | pseudo_huber
            huber_c=0.0,  # pseudo-Huber c; 0 -> 0.00054 sqrt(H W C) (iCT)
            weighting="uniform",  # uniform (CM) | ict (1 / (sigma_{n+1} - sigma_n))
            index_distribution="uniform",  # pair index n: uniform (CM) | lognormal (iCT, p_mean / p_std)
            p_mean=-1.1,
            p_std=2.0,
            num_points=18,  # cd: N, the fixed number of discretisation points
            target_ema=0.95,  # cd: mu, the target network's EMA decay
            curriculum="cm",  # ct: cm (N(k), mu(k) of CM with s0, s1, mu0) | ict (doubling N(k), no EMA target)
            s0=2,  # ct: initial discretisation steps
            s1=150,  # ct: final discretisation steps
            mu0=0.9,  # ct, curriculum='cm': the target EMA decay at step 0
            sample_steps=1,  # cd, ct, add: steps of the training-time sample grid (pd uses the round's count)
        )
    )
    # fewstep.method='add': adversarial diffusion distillation (Sauer et al. 2023; research/diffusion/adversarial.py,
    # research/tasks/add.py). The teacher is fewstep.teacher_workdir; the student starts as it.
    c.add = ml_collections.ConfigDict(
        dict(
            student_timesteps=4,  # k: the student trains at the trailing grid of k timesteps (999/749/499/249)
            distill_weight=2.5,  # lambda of the distillation term (the paper's 2.5); 0 drops it
            adversarial_weight=1.0,  # weight of the generator's adversarial term; 0 drops it (distillation only)
            weighting="alpha",  # c(t) of the distillation term: alpha (sqrt(alpha_bar_t), ADD) | alpha_bar | uniform
            teacher_guidance=1.0,  # classifier-free guidance scale of the teacher's target (class-conditional teachers)
            features="classifier",  # the discriminator's frozen feature network: classifier | teacher
            feature_t=100,  # 'teacher' features: the timestep the input is re-noised to before the teacher's encoder
            disc_width=64,  # width of each discriminator head
            disc_lr=1e-4,  # the discriminator's Adam (b1 = 0, b2 = 0.99, as GANs since StyleGAN use)
            r1_gamma=0.1,  # R1 penalty gamma on real data (the loss adds gamma / 2 * R1); 0 drops it
            disc_steps=1,  # discriminator updates per generator update (the update ratio), on the same batch
        )
    )

    # Latent diffusion (Rombach et al. 2022): with latent.autoencoder set, config.data still describes the pixel
    # data, the diffusion model sees scale * z of that autoencoder ([H/f, W/f, z_channels]) and sampling decodes
    # to pixels. See research/latents.py.
    c.latent = ml_collections.ConfigDict(
        dict(
            autoencoder="",  # workdir of a task='autoencoder' run; '' trains in pixel space
            step=0,  # its checkpoint step; 0 takes the newest (the resolved step is stored in config.json)
            use_ema=True,  # the autoencoder's EMA parameters
            normalization="scale",  # scale: z * (1 / std over all elements) (LDM, Stable Diffusion) | channel:
            # (z - mean_c) / std_c per latent channel (statistics stored with the scale)
            downsample_factor=0,  # declared latent geometry, checked against the autoencoder at start-up;
            channels=0,  # 0 reads it from the autoencoder's config.json
            cache=True,  # encode the training split once (posterior mean and std) to a cache read by grain,
            # drawing z ~ q(z|x) per step from it; False encodes every batch on the fly
            cache_dir="",  # '' -> AUTOENCODER_WORKDIR/latent_cache
        )
    )
    # task='clip' (Radford et al. 2021): contrastive image-caption training on a captioned dataset. Every example's
    # caption is one of the dataset's training templates filled with its class name, drawn per step (research/data/
    # text.py); the held-out templates are kept for the zero-shot evaluation.
    c.clip = ml_collections.ConfigDict(
        dict(
            loss="clip",  # clip: symmetric InfoNCE over the global batch | siglip: sigmoid loss (Zhai et al. 2023)
            tokenizer="",  # folder with the CLIP tokenizer (vocab.json, merges.txt); '' -> $RESEARCH_DATA_DIR/clip
            shift=2,  # augmentation: random translation by up to this many pixels (background padding); 0: none
            eval_num=2000,  # test images of the zero-shot check written every train.sample_every steps
        )
    )
    # task='text_to_image' (Rombach et al. 2022): a text-conditional U-Net (model.name='cond_unet') on captioned data,
    # conditioned on a text encoder's token embeddings through cross-attention. Prompt dropout for classifier-free
    # guidance is diffusion.cond_drop_prob: a dropped example's caption becomes the empty prompt.
    c.text = ml_collections.ConfigDict(
        dict(
            encoder="",  # '' -> a text transformer trained with the U-Net (LDM's choice); a CLIP run's workdir
            # (task='clip') -> its text tower, frozen (the run is referenced, as latent.autoencoder is)
            tokenizer="",  # folder with the CLIP tokenizer; '' -> $RESEARCH_DATA_DIR/clip
            context_length=77,  # tokens per caption (the jointly trained encoder's; a CLIP run brings its own)
            width=256,  # the jointly trained encoder: width, blocks and heads (CLIP's text transformer)
            layers=4,
            heads=4,
            mlp_dim=0,  # its MLP width; 0 -> 4 * width (CLIP's)
            act="quick_gelu",  # its MLP activation: quick_gelu (OpenAI CLIP, SD 1.x) | gelu (OpenCLIP, SD 2.x)
            output_layer=-1,  # the encoder's block whose (final-LN) hidden states condition: -1 last, -2 penultimate
            mask=True,  # cross-attention ignores padding tokens (Stable Diffusion attends all 77: False)
        )
    )
    # task='controlnet' (Zhang, Rao & Agrawala 2023): a ControlNet trained on a frozen base run. model.name is
    # 'unet_controlnet' (or 'cond_unet_controlnet') with the hint encoder's fields; the rest of the model section and
    # the diffusion section are the base run's, copied from its config.json when the run starts.
    c.controlnet = ml_collections.ConfigDict(
        dict(
            base="",  # workdir of the base run (task='diffusion', a pixel-space U-Net), frozen and referenced
            base_step=0,  # its checkpoint step; 0 takes the newest (the resolved step is stored in config.json)
            base_use_ema=True,  # the base's EMA parameters
            hint="canny",  # the hint computed from each training image: canny | sobel | mask | blur (data/hints.py)
            scale=1.0,  # conditioning scale of the residuals at sampling (training always uses 1)
            guess_mode=False,  # sampling: scale the residuals by 0.825 ** (12 - i) (the reference's guess mode)
            eval_num=200,  # test images of the controllability check (edge F1) written at every preview
        )
    )
    c.lock()
    return c


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """Rebuild a run's config (e.g. its config.json) on top of base_config(), so keys added to the codebase
    since the run was written take their defaults. Lists become tuples where the field is a tuple."""
    config = base_config()
    for section, fields in values.items():
        if not isinstance(fields, dict):
            config[section] = fields
            continue
        if section not in config:
            continue
        if section == "model":  # a model section belongs to its backbone: take it whole
            stored = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
            if stored.get("name", "unet") == config.model.name:  # a U-Net: keys added since take their defaults
                stored = {**config.model.to_dict(), **stored}
            with config.unlocked():
                config.model = ml_collections.ConfigDict(stored)
            continue
        node = config[section]
        for key, value in fields.items():
            if key in node:
                node[key] = tuple(value) if isinstance(node[key], tuple) and isinstance(value, list) else value
    return config


def parse_variant(variant: str, bases, suffixes: dict, usage: str):
    """A config file's variant '<base>[-<suffix>]...' -> (base, {suffix name: value}). `suffixes` maps each suffix's
    name (its leading text) to a parser of the text after the name that returns None for bad text; each suffix may
    appear once. ValueError 'unknown variant ...: use <usage>' otherwise."""
    base, *mods = variant.split("-")
    values, valid = {}, base in bases
    for mod in mods:
        name = next((n for n in suffixes if mod.startswith(n)), None)
        value = None if name is None or name in values else suffixes[name](mod[len(name) :])
        if value is None:
            valid = False
        else:
            values[name] = value
    if not valid:
        raise ValueError(f"unknown variant {variant!r}: use {usage}")
    return base, values


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Load `file.py` (get_config()) or `file.py:arg` (get_config(arg), for files with named variants)."""
    arg = None
    if not os.path.isfile(path) and ":" in path:
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (configs live in configs/, e.g. configs/quickstart.py)")
    if not path.endswith(".py"):
        raise ConfigError(
            f"config file {path!r} is not a Python file: a config is a .py file with get_config() "
            f"(e.g. configs/quickstart.py)"
        )
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path}: syntax error at line {e.lineno}: {e.msg}") from None
    except (ImportError, NameError) as e:
        raise ConfigError(f"{path} fails to load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(); a config file returns its ConfigDict from get_config()")
    try:
        config = module.get_config() if arg is None else module.get_config(arg)
    except (AttributeError, KeyError) as e:
        # ConfigDict raises these for a key that base_config() does not define.
        raise ConfigError(f"{path}: {e}") from e
    except ValueError as e:  # e.g. an unknown variant name
        raise ConfigError(f"{path}: {e}") from None
    except TypeError as e:
        what = "takes no variant" if arg is not None else "needs a variant (file.py:variant)"
        raise ConfigError(f"{path}: get_config() {what}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned a {type(config).__name__}, not an ml_collections.ConfigDict")
    return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> List[str]:
    keys = []
    for k, v in config.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _parse_value(text: str, current):
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected true/false, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"cannot parse {text!r} as a {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (int, float)):
        value = (value,)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if (
        current is not None
        and not isinstance(value, type(current))
        and not (isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)))
    ):
        raise ConfigError(f"expected a {type(current).__name__}, got {text!r}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[Tuple[str, str]]):
    """Set dotted keys from strings, typed after the current value. Unknown keys fail with a suggestion."""
    config = config.copy_and_resolve_references()
    known = _all_keys(config)
    for key, text in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; run with --help to list keys")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        try:
            value = _parse_value(text, node[leaf])
        except ConfigError as e:
            raise ConfigError(f"--config.{key}: {e}") from None
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[leaf] = value
    return config


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def parse_config_args(argv: Sequence[str]):
    """Split argv into (config path, [(key, value)], remaining args).

    Accepts `--config path`, `--config=path` and `--config.a.b=v` / `--config.a.b v`.
    """
    path, overrides, rest = None, [], []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                path = arg.split("=", 1)[1]
            else:
                i += 1
                if i >= len(argv):
                    raise ConfigError("--config needs a file path")
                path = argv[i]
        elif arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" in body:
                key, value = body.split("=", 1)
            else:
                i += 1
                if i >= len(argv):
                    raise ConfigError(f"--config.{body} needs a value")
                key, value = body, argv[i]
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return path, overrides, rest


_CHOICES = {
    "data.name": ("digits", "mnist", "fashion_mnist", "mnist_fashion", "cifar10", "tfds", "imagefolder", "synthetic"),
    "diffusion.schedule": ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "sigmoid"),
    "diffusion.prediction": ("eps", "x0", "v"),
    "diffusion.var_type": ("fixed_small", "fixed_large", "learned_range"),
    "diffusion.loss": ("simple", "hybrid", "vlb"),
    "diffusion.t_sampling": ("uniform", "importance"),
    "optim.optimizer": ("adam", "adamw"),
    "optim.lr_schedule": ("constant", "cosine", "linear"),
    "clip.loss": ("clip", "siglip"),
    "sample.sampler": ("ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2s", "unipc"),  # = diffusion.samplers.SAMPLERS
    "sample.grid": ("uniform", "logsnr", "karras"),
    "train.loss_scale": ("auto", "dynamic", "off"),  # research/train/grads.py
}


def validate_common(config: ml_collections.ConfigDict) -> None:
    """Checks of the sections every task shares. The task's own checks run in research.tasks.validate_config,
    which calls this first; nothing here builds a model or reads a file."""
    for key, choices in _CHOICES.items():
        section, leaf = key.split(".")
        value = config[section][leaf]
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")
    positive = [
        "data.image_size",
        "data.channels",
        "diffusion.timesteps",
        "train.batch_size",
        "train.num_steps",
        "train.log_every",
        "train.ckpt_every",
        "train.mesh_model",
        "train.grad_accum",
        "sample.num",
        "sample.batch_size",
    ]
    for key in positive:
        section, leaf = key.split(".")
        if int(config[section][leaf]) < 1:
            raise ConfigError(f"{key} must be >= 1, got {config[section][leaf]}")
    if config.train.batch_size % config.train.grad_accum:
        raise ConfigError(
            f"train.grad_accum={config.train.grad_accum} must divide train.batch_size={config.train.batch_size} "
            f"(microbatches of equal size)"
        )
    if config.train.num_devices < 0:
        raise ConfigError(f"train.num_devices must be >= 0 (0: all devices), got {config.train.num_devices}")
    if config.train.fid_every < 0 or config.train.fid_every % config.train.ckpt_every:
        raise ConfigError(
            f"train.fid_every={config.train.fid_every} must be 0 (off) or a multiple of train.ckpt_every="
            f"{config.train.ckpt_every}: the FID is computed from the checkpoint saved at that step"
        )
    if config.train.fid_every and config.train.fid_num < 2:
        raise ConfigError(f"train.fid_num must be >= 2 for a covariance, got {config.train.fid_num}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
    d = config.diffusion
    if d.var_type == "learned_range" and d.loss == "simple":
        raise ConfigError(
            "diffusion.var_type='learned_range' trains its variance only through L_vlb: set "
            "diffusion.loss='hybrid' (iDDPM) or 'vlb'"
        )
    if d.loss == "hybrid" and d.var_type != "learned_range":
        raise ConfigError(
            "diffusion.loss='hybrid' adds L_vlb to train a learned variance: set "
            "diffusion.var_type='learned_range' (or use loss='simple' with a fixed variance)"
        )
    if d.t_sampling == "importance" and d.loss != "vlb":
        raise ConfigError(
            "diffusion.t_sampling='importance' is for diffusion.loss='vlb' (the iDDPM paper uses it "
            "only there; L_simple and L_hybrid use uniform t)"
        )
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {config.optim.lr}")
    if not 0.0 <= config.sample.eta:
        raise ConfigError(f"sample.eta must be >= 0, got {config.sample.eta}")


def config_help(config: ml_collections.ConfigDict) -> str:
    lines = []
    for key in _all_keys(config):
        node = config
        for p in key.split("."):
            node = node[p]
        if not isinstance(node, ml_collections.ConfigDict):
            lines.append(f"  --config.{key}={node!r}")
    return "\n".join(lines)
