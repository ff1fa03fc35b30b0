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
    c.task = "diffusion"        # diffusion | autoencoder (latent diffusion's KL autoencoder, model.name='vae')

    c.data = ml_collections.ConfigDict(dict(
        name="digits",          # digits | mnist | fashion_mnist | cifar10 | tfds | synthetic
        data_dir="",            # '' -> $RESEARCH_DATA_DIR/<name> for file-based sets
        tfds_name="",           # with name='tfds'
        image_size=8,
        channels=1,
        num_classes=10,
        random_flip=False,
        centered=True,          # scale pixels to [-1, 1] (False: [0, 1])
        num_threads=0,          # grain read threads; 0 reads in the training thread
        num_examples=0,         # synthetic only: dataset size (0 -> 10,000)
        synthetic_seed=0,       # synthetic only
    ))

    # U-Net defaults; a config for another backbone replaces config.model with its own fields.
    c.model = ml_collections.ConfigDict(dict(
        name="unet", ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), num_heads=1,
        head_channels=-1, dropout=0.1, use_scale_shift_norm=False, resamp_with_conv=True, num_classes=0,
        norm_groups=32, norm_eps=1e-6, dtype="float32",
    ))

    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="linear",      # linear | scaled_linear | cosine | sigmoid
        timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        prediction="eps",       # eps | x0 | v
        var_type="fixed_small",  # fixed_small | fixed_large | learned_range
        loss="simple",          # simple | hybrid (simple + vlb_weight * L_vlb, iDDPM) | vlb
        vlb_weight=0.001,       # lambda of L_hybrid
        t_sampling="uniform",   # uniform | importance (loss-aware sampling of t for L_vlb, iDDPM Sec. 3.3)
    ))

    c.optim = ml_collections.ConfigDict(dict(
        optimizer="adam",       # adam | adamw
        lr=2e-4,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=5000,
        lr_schedule="constant",  # constant | cosine (decay to 0 at train.num_steps)
        grad_clip=1.0,          # global-norm clip; 0 disables
    ))

    c.train = ml_collections.ConfigDict(dict(
        batch_size=128,         # global, over all devices and hosts
        num_steps=800_000,
        ema_decay=0.9999,
        ema_warmup=False,       # decay min(ema_decay, (1+k)/(10+k)); off in the paper recipes
        log_every=100,
        ckpt_every=5000,
        keep_checkpoints=3,
        sample_every=10_000,    # 0 disables sample grids during training
        mesh_model=1,           # size of the parameter-sharding mesh axis ('model'); the rest is 'data'
        progress=True,
    ))

    c.sample = ml_collections.ConfigDict(dict(
        sampler="ddim",         # ddim | ddpm
        steps="50",             # count (evenly spaced), "ddimN" (DDIM stride), or "t1,t2,..." timesteps
        eta=0.0,
        num=64,
        batch_size=256,
        clip_x0=True,
        use_ema=True,
    ))

    # task='autoencoder' (Rombach et al. 2022, LDM's AutoencoderKL). As in LDM, the reconstruction loss is summed
    # over pixels and the KL over latent dimensions per example, both averaged over the batch, so kl_weight has
    # the meaning of LDM's configs. The training-step grid shows sample.num test images over their reconstructions.
    c.autoencoder = ml_collections.ConfigDict(dict(
        recon_loss="l1",        # l1 | l2
        kl_weight=1e-6,
        disc_weight=0.0,        # weight of the hinge GAN loss; 0 builds no discriminator at all
        disc_start=50_001,      # step from which the discriminator trains and its loss is applied (LDM: 50001)
        adaptive_disc_weight=True,  # LDM: scale by |grad rec| / |grad gan| at the decoder's last layer
        disc_lr=4.5e-6,         # Adam with betas (disc_b1, disc_b2), constant rate
        disc_b1=0.5,
        disc_b2=0.9,
        disc_ch=64,
        disc_layers=3,          # stride-2 convs; the logit map is (H / 2**disc_layers)^2
        disc_norm_groups=32,
        scale_num_images=1024,  # training images whose encoded latents set latent_scale = 1 / std
    ))

    # task='fewstep' (research/train/fewstep.py): a few-step student from a teacher checkpoint (pd, cd) or from
    # scratch (ct). model / diffusion / data must match the teacher's (checked at init). The student's sampling
    # parameters are a separate EMA with train.ema_decay (sample.use_ema picks it, as for diffusion runs).
    c.fewstep = ml_collections.ConfigDict(dict(
        method="pd",            # pd (Salimans & Ho 2022) | cd (consistency distillation) | ct (consistency training)
        teacher_workdir="",     # pd, cd: workdir of a task='diffusion' run
        teacher_step=-1,        # its checkpoint step; -1 takes the newest
        teacher_use_ema=True,   # distil the teacher's EMA parameters
        # Progressive distillation: rounds halve pd_start_steps down to pd_final_steps; with T=1000 pd_start_steps
        # must divide into T so the trailing grids nest (512, 256, ... all work).
        pd_start_steps=512,     # the teacher's DDIM step count in round 0
        pd_final_steps=1,       # the last round's student step count
        pd_steps_per_round=50_000,  # optimizer steps per halving; train.num_steps must be rounds * this
        pd_weighting="truncated_snr",  # truncated_snr (the paper's max(SNR, 1)) | snr_plus_one | none
        pd_clip_x0=False,       # clip the teacher's x0 predictions to [-1, 1] inside the target's two DDIM steps
        # Consistency models (cd, ct): the discretisation is CM's Karras grid on [sigma_min, sigma_max] (cd clips it
        # to the teacher schedule's own range).
        sigma_min=0.002,
        sigma_max=80.0,
        rho=7.0,
        sigma_data=0.5,         # of the boundary-condition scalings c_skip, c_out
        solver="heun",          # cd: the teacher ODE step, euler | heun
        distance="l2",          # l2 (mean squared) | pseudo_huber
        huber_c=0.0,            # pseudo-Huber c; 0 -> 0.00054 sqrt(H W C) (iCT)
        weighting="uniform",    # uniform (CM) | ict (1 / (sigma_{n+1} - sigma_n))
        index_distribution="uniform",  # pair index n: uniform (CM) | lognormal (iCT, p_mean / p_std)
        p_mean=-1.1,
        p_std=2.0,
        num_points=18,          # cd: N, the fixed number of discretisation points
        target_ema=0.95,        # cd: mu, the target network's EMA decay
        curriculum="cm",        # ct: cm (N(k), mu(k) of CM with s0, s1, mu0) | ict (doubling N(k), no EMA target)
        s0=2,                   # ct: initial discretisation steps
        s1=150,                 # ct: final discretisation steps
        mu0=0.9,                # ct, curriculum='cm': the target EMA decay at step 0
        sample_steps=1,         # cd, ct: steps of the training-time sample grid (pd uses the round's count)
    ))

    # Latent diffusion (Rombach et al. 2022): with latent.autoencoder set, config.data still describes the pixel
    # data, the diffusion model sees scale * z of that autoencoder ([H/f, W/f, z_channels]) and sampling decodes
    # to pixels. See research/latents.py.
    c.latent = ml_collections.ConfigDict(dict(
        autoencoder="",         # workdir of a task='autoencoder' run; '' trains in pixel space
        step=0,                 # its checkpoint step; 0 takes the newest (the resolved step is stored in config.json)
        use_ema=True,           # the autoencoder's EMA parameters
        normalization="scale",  # scale: z * (1 / std over all elements) (LDM, Stable Diffusion) | channel:
                                # (z - mean_c) / std_c per latent channel (statistics stored with the scale)
        downsample_factor=0,    # declared latent geometry, checked against the autoencoder at start-up;
        channels=0,             # 0 reads it from the autoencoder's config.json
        cache=True,             # encode the training split once (posterior mean and std) to a cache read by grain,
                                # drawing z ~ q(z|x) per step from it; False encodes every batch on the fly
        cache_dir="",           # '' -> AUTOENCODER_WORKDIR/latent_cache
    ))
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
            with config.unlocked():
                config.model = ml_collections.ConfigDict(
                    {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
            continue
        node = config[section]
        for key, value in fields.items():
            if key in node:
                node[key] = tuple(value) if isinstance(node[key], tuple) and isinstance(value, list) else value
    return config


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Load `file.py` (get_config()) or `file.py:arg` (get_config(arg), for files with named variants)."""
    arg = None
    if not os.path.isfile(path) and ":" in path:
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (configs live in configs/, e.g. configs/quickstart.py)")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config() if arg is None else module.get_config(arg)
    except (AttributeError, KeyError) as e:
        # ConfigDict raises these for a key that base_config() does not define.
        raise ConfigError(f"{path}: {e}") from e
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
        raise ConfigError(f"cannot parse {text!r} as a {type(current).__name__}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (int, float)):
        value = (value,)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and not isinstance(value, type(current)) and not (
            isinstance(current, (tuple, list)) and isinstance(value, (tuple, list))):
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
            body = arg[len("--config."):]
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


def get_config(path: str, overrides: Iterable[Tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    config = apply_overrides(load_config_file(path), overrides)
    validate_config(config)
    return config


_CHOICES = {
    "data.name": ("digits", "mnist", "fashion_mnist", "cifar10", "tfds", "synthetic"),
    "diffusion.schedule": ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "sigmoid"),
    "diffusion.prediction": ("eps", "x0", "v"),
    "diffusion.var_type": ("fixed_small", "fixed_large", "learned_range"),
    "diffusion.loss": ("simple", "hybrid", "vlb"),
    "diffusion.t_sampling": ("uniform", "importance"),
    "optim.optimizer": ("adam", "adamw"),
    "optim.lr_schedule": ("constant", "cosine"),
    "sample.sampler": ("ddpm", "ddim"),
    "autoencoder.recon_loss": ("l1", "l2"),
}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fail before any compilation on values that cannot work, naming the key and the fix."""
    for key, choices in _CHOICES.items():
        section, leaf = key.split(".")
        value = config[section][leaf]
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")
    positive = ["data.image_size", "data.channels", "diffusion.timesteps", "train.batch_size", "train.num_steps",
                "train.log_every", "train.ckpt_every", "train.mesh_model", "sample.num", "sample.batch_size"]
    for key in positive:
        section, leaf = key.split(".")
        if int(config[section][leaf]) < 1:
            raise ConfigError(f"{key} must be >= 1, got {config[section][leaf]}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
    d = config.diffusion
    if d.var_type == "learned_range" and d.loss == "simple":
        raise ConfigError("diffusion.var_type='learned_range' trains its variance only through L_vlb: set "
                          "diffusion.loss='hybrid' (iDDPM) or 'vlb'")
    if d.loss == "hybrid" and d.var_type != "learned_range":
        raise ConfigError("diffusion.loss='hybrid' adds L_vlb to train a learned variance: set "
                          "diffusion.var_type='learned_range' (or use loss='simple' with a fixed variance)")
    if d.t_sampling == "importance" and d.loss != "vlb":
        raise ConfigError("diffusion.t_sampling='importance' is for diffusion.loss='vlb' (the iDDPM paper uses it "
                          "only there; L_simple and L_hybrid use uniform t)")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {config.optim.lr}")
    _validate_task(config)
    _validate_latent(config)
    if not 0.0 <= config.sample.eta:
        raise ConfigError(f"sample.eta must be >= 0, got {config.sample.eta}")
    from research.latents import model_input_shape
    from research.models import build_model
    height, width, channels = model_input_shape(config)
    what = (f"the {height}x{width}x{channels} latents of latent.autoencoder" if config.latent.autoencoder
            else f"data.image_size={config.data.image_size}")
    try:
        model = build_model(config.model, out_channels=channels)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.model.name == "dit":
        from research.models.dit import check_input_size
        try:
            check_input_size((height, width), model.architecture[3])
        except ValueError as e:
            raise ConfigError(f"{what}: {e}") from None
    if config.model.name == "unet":
        from research.models.unet import check_resolution
        try:
            check_resolution((height, width), len(config.model.ch_mult))
        except ValueError as e:
            raise ConfigError(f"{what} with model.ch_mult={tuple(config.model.ch_mult)}: {e}") from None
        ch = config.model.ch
        for m in config.model.ch_mult:
            if (ch * m) % min(config.model.norm_groups, ch * m):
                raise ConfigError(f"model.ch * mult = {ch * m} is not divisible by model.norm_groups="
                                  f"{config.model.norm_groups}")
    if config.model.get("num_classes", 0) and config.model.num_classes != config.data.num_classes:
        raise ConfigError(f"model.num_classes={config.model.num_classes} but data.num_classes="
                          f"{config.data.num_classes}; set them equal (or model.num_classes=0 for unconditional)")


def _validate_fewstep(config: ml_collections.ConfigDict) -> None:
    """task='fewstep': method-specific values, and PD's round / checkpoint layout."""
    f, tc = config.fewstep, config.train
    choices = {"method": ("pd", "cd", "ct"), "pd_weighting": ("truncated_snr", "snr_plus_one", "none"),
               "solver": ("euler", "heun"), "distance": ("l2", "pseudo_huber"), "weighting": ("uniform", "ict"),
               "index_distribution": ("uniform", "lognormal"), "curriculum": ("cm", "ict")}
    for key, allowed in choices.items():
        if f[key] not in allowed:
            raise ConfigError(f"fewstep.{key}={f[key]!r} is not valid; choose one of {list(allowed)}")
    if config.diffusion.var_type == "learned_range":
        raise ConfigError("task='fewstep' distils the mean of a fixed-variance model; use a teacher with "
                          "diffusion.var_type='fixed_small' or 'fixed_large'")
    if f.method in ("pd", "cd") and not f.teacher_workdir:
        raise ConfigError(f"fewstep.method={f.method!r} distils a teacher: set fewstep.teacher_workdir to its workdir")
    if f.method == "pd":
        from research.diffusion.distillation import pd_num_rounds
        try:
            rounds = pd_num_rounds(f.pd_start_steps, f.pd_final_steps)
        except ValueError as e:
            raise ConfigError(f"fewstep.pd_start_steps / pd_final_steps: {e}") from None
        if rounds < 1 or f.pd_start_steps > config.diffusion.timesteps:
            raise ConfigError(f"fewstep.pd_start_steps={f.pd_start_steps} must exceed pd_final_steps="
                              f"{f.pd_final_steps} and be at most diffusion.timesteps={config.diffusion.timesteps}")
        if f.pd_steps_per_round < 1 or tc.num_steps != rounds * f.pd_steps_per_round:
            raise ConfigError(f"train.num_steps={tc.num_steps} must equal the {rounds} rounds times "
                              f"fewstep.pd_steps_per_round={f.pd_steps_per_round} = {rounds * f.pd_steps_per_round}")
        if f.pd_steps_per_round % tc.ckpt_every:
            raise ConfigError(f"train.ckpt_every={tc.ckpt_every} must divide fewstep.pd_steps_per_round="
                              f"{f.pd_steps_per_round} so every round's student is checkpointed")
        if tc.keep_checkpoints is not None and tc.keep_checkpoints < tc.num_steps // tc.ckpt_every:
            raise ConfigError(f"train.keep_checkpoints={tc.keep_checkpoints} would delete earlier rounds' students: "
                              f"set it to at least {tc.num_steps // tc.ckpt_every} (or None to keep all)")
    if not 0.0 < f.sigma_min < f.sigma_max:
        raise ConfigError(f"need 0 < fewstep.sigma_min < fewstep.sigma_max, got {f.sigma_min}, {f.sigma_max}")
    if f.rho <= 0 or f.sigma_data <= 0 or f.p_std <= 0 or f.huber_c < 0:
        raise ConfigError("fewstep.rho, sigma_data and p_std must be positive and huber_c >= 0")
    if f.method == "cd":
        if f.num_points < 2 or not 0.0 <= f.target_ema < 1.0:
            raise ConfigError(f"cd needs fewstep.num_points >= 2 and 0 <= fewstep.target_ema < 1, got "
                              f"{f.num_points}, {f.target_ema}")
    if f.method == "ct":
        if f.s0 < 1 or f.s1 < f.s0:
            raise ConfigError(f"ct needs 1 <= fewstep.s0 <= fewstep.s1, got s0={f.s0}, s1={f.s1}")
        if f.curriculum == "cm" and (f.s0 < 2 or not 0.0 < f.mu0 < 1.0):
            raise ConfigError(f"curriculum='cm' needs fewstep.s0 >= 2 (N(0) = s0 points) and 0 < mu0 < 1, got "
                              f"s0={f.s0}, mu0={f.mu0}")
    if f.sample_steps < 1:
        raise ConfigError(f"fewstep.sample_steps must be >= 1, got {f.sample_steps}")


def _validate_task(config: ml_collections.ConfigDict) -> None:
    tasks = ("diffusion", "autoencoder", "fewstep")
    if config.task not in tasks:
        raise ConfigError(f"task={config.task!r} is not valid; choose one of {list(tasks)}")
    if (config.task == "autoencoder") != (config.model.name == "vae"):
        raise ConfigError(f"task={config.task!r} with model.name={config.model.name!r}: the autoencoder task trains "
                          f"model 'vae' and only it (see configs/vae_mnist.py); set both or neither")
    if config.task == "fewstep":
        _validate_fewstep(config)
    if config.task != "autoencoder":
        return
    a = config.autoencoder
    for key in ("kl_weight", "disc_weight", "disc_start"):
        if a[key] < 0:
            raise ConfigError(f"autoencoder.{key} must be >= 0, got {a[key]}")
    for key in ("disc_lr", "disc_ch", "disc_layers", "scale_num_images"):
        if a[key] <= 0:
            raise ConfigError(f"autoencoder.{key} must be positive, got {a[key]}")
    from research.models.vae import check_autoencoder_resolution
    size = config.data.image_size
    try:
        check_autoencoder_resolution((size, size), len(config.model.ch_mult))
    except ValueError as e:
        raise ConfigError(f"data.image_size={size} with model.ch_mult={tuple(config.model.ch_mult)}: {e}") from None
    groups = config.model.get("norm_groups", 32)
    for m in config.model.ch_mult:
        c = config.model.ch * m
        if c % min(groups, c):
            raise ConfigError(f"model.ch * mult = {c} is not divisible by model.norm_groups={groups}")
    if a.disc_weight > 0:
        for i in range(1, a.disc_layers + 1):
            c = a.disc_ch * min(2 ** i, 8)
            if c % min(a.disc_norm_groups, c):
                raise ConfigError(f"the discriminator's {c} channels (autoencoder.disc_ch * {min(2 ** i, 8)}) are not "
                                  f"divisible by autoencoder.disc_norm_groups={a.disc_norm_groups}")


def _validate_latent(config: ml_collections.ConfigDict) -> None:
    lat = config.latent
    if not lat.autoencoder:
        return
    if config.task != "diffusion":
        raise ConfigError(f"latent.autoencoder is for diffusion runs; task={config.task!r} trains on pixels "
                          f"(set latent.autoencoder='')")
    for key in ("step", "downsample_factor", "channels"):
        if lat[key] < 0:
            raise ConfigError(f"latent.{key} must be >= 0, got {lat[key]}")
    if lat.normalization not in ("scale", "channel"):
        raise ConfigError(f"latent.normalization={lat.normalization!r} is not valid; choose one of "
                          f"['scale', 'channel']")
    if config.sample.clip_x0:
        raise ConfigError("latents are not bounded to [-1, 1], so clipping the x0 prediction would distort them: "
                          "set sample.clip_x0=False for a latent diffusion run")
    if lat.cache and config.data.random_flip:
        raise ConfigError("the latent cache stores the encodings of unflipped images: set latent.cache=False "
                          "(encode every batch, flips included) or data.random_flip=False")


def config_help(config: ml_collections.ConfigDict) -> str:
    lines = []
    for key in _all_keys(config):
        node = config
        for p in key.split("."):
            node = node[p]
        if not isinstance(node, ml_collections.ConfigDict):
            lines.append(f"  --config.{key}={node!r}")
    return "\n".join(lines)
