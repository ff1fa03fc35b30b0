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


@register_model("vae")
def _vae():
    from research.models.vae import AutoencoderKL
    return AutoencoderKL


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
    for key, value in cfg.items():
        if isinstance(value, list):
            cfg[key] = tuple(value)
    return cls(out_channels=out_channels, **cfg)
