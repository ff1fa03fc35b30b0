"""config.model.name -> Flax module class; every other field of config.model is a constructor argument."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import jax.numpy as jnp

_REGISTRY: Dict[str, Callable[[], type]] = {}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def register_model(name: str):
    def wrap(loader):
        _REGISTRY[name] = loader
        return loader

    return wrap


@register_model("unet")
def _unet():
    from research.models.unet import UNet

    return UNet


@register_model("dit")
def _dit():
    from research.models.dit import DiT

    return DiT


@register_model("half_unet")
def _half_unet():
    # ADM's noise-aware classifier; build_model's out_channels (the image channels) is accepted and ignored: its
    # output size is model.num_classes.
    from research.models.classifier import HalfUNet

    return HalfUNet


@register_model("vae")
def _vae():
    from research.models.vae import AutoencoderKL

    return AutoencoderKL


@register_model("clip")
def _clip():
    # Contrastive image-text model; build_model's out_channels is accepted and ignored (it has no image output).
    from research.models.clip import CLIP

    return CLIP


@register_model("cond_unet")
def _cond_unet():
    # Stable Diffusion's text-conditional U-Net (diffusers UNet2DConditionModel layout).
    from research.models.cond_unet import CondUNet

    return CondUNet


@register_model("unet_controlnet")
def _unet_controlnet():
    # ControlNet of the DDPM / ADM U-Net; out_channels is accepted and unused (it emits residuals).
    from research.models.controlnet import UNetControlNet

    return UNetControlNet


@register_model("cond_unet_controlnet")
def _cond_unet_controlnet():
    # ControlNet of Stable Diffusion's U-Net (diffusers ControlNetModel layout).
    from research.models.controlnet import CondUNetControlNet

    return CondUNetControlNet


def model_names():
    return sorted(_REGISTRY)


def build_model(model_config, *, out_channels: int):
    """Instantiate the module named by model_config.name with the remaining fields as arguments.

    Unknown fields are rejected with the list of accepted ones, so a typo never silently becomes a default.
    """
    cfg = dict(model_config)
    name = cfg.pop("name")
    if name not in _REGISTRY:
        raise ValueError(f"model.name={name!r} is not a known model; choose one of {model_names()}")
    cls = _REGISTRY[name]()
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "out_channels"}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(f"model.{unknown[0]} is not an argument of {cls.__name__}; accepted: {sorted(fields)}")
    if "dtype" in cfg:
        if cfg["dtype"] not in _DTYPES:
            raise ValueError(f"model.dtype={cfg['dtype']!r}; choose one of {sorted(_DTYPES)}")
        cfg["dtype"] = _DTYPES[cfg["dtype"]]
    if "remat" in cfg:
        from research.models.layers import remat_policy_name

        cfg["remat"] = remat_policy_name(cfg["remat"])
    for key, value in cfg.items():
        if isinstance(value, list):
            cfg[key] = tuple(value)
    return cls(out_channels=out_channels, **cfg)


def _check_group_norm(model_config, levels) -> None:
    ch, groups = int(model_config["ch"]), int(model_config.get("norm_groups", 32))
    for m in model_config["ch_mult"]:
        if (ch * m) % min(groups, ch * m):
            raise ValueError(f"model.ch * mult = {ch * m} is not divisible by model.norm_groups={groups}")


def check_input_shape(model_config, shape) -> None:
    """Raise ValueError naming the fix when the model named by model_config cannot take inputs [H, W, C]."""
    cfg = dict(model_config)
    name, (height, width) = cfg.get("name"), tuple(shape[:2])
    if name in ("unet_controlnet", "cond_unet_controlnet"):
        from research.models.controlnet import hint_strides

        hint_strides(cfg.get("hint_channels", (16, 32, 96, 256)), int(cfg.get("hint_downsample", 1)))
        name = name[: -len("_controlnet")]
    if name == "unet":
        from research.models.unet import check_resolution

        check_resolution((height, width), len(cfg["ch_mult"]))
        _check_group_norm(cfg, len(cfg["ch_mult"]))
    elif name == "dit":
        from research.models.dit import check_input_size, dit_architecture

        arch = dit_architecture(
            cfg.get("variant", ""),
            cfg.get("depth", 0),
            cfg.get("hidden_size", 0),
            cfg.get("num_heads", 0),
            cfg.get("patch_size", 0),
        )
        check_input_size((height, width), arch[3])
    elif name == "half_unet":
        from research.models.unet import check_resolution

        check_resolution((height, width), len(cfg["ch_mult"]))
        _check_group_norm(cfg, len(cfg["ch_mult"]))
    elif name == "vae":
        from research.models.vae import check_autoencoder_resolution

        check_autoencoder_resolution((height, width), len(cfg["ch_mult"]))
        _check_group_norm(cfg, len(cfg["ch_mult"]))
    elif name == "cond_unet":
        from research.models.cond_unet import check_cond_unet_input

        check_cond_unet_input(cfg, shape)
    elif name == "clip":
        from research.models.clip import CLIP

        size, patch = int(cfg.get("image_size", CLIP.image_size)), int(cfg.get("patch_size", CLIP.patch_size))
        if size % patch:
            raise ValueError(f"model.image_size={size} is not divisible by model.patch_size={patch}")
        if (height, width) != (size, size):
            raise ValueError(f"data images are {height}x{width} but model.image_size={size}; make them equal")
