"""Flax backbones and the registry that builds them from a config."""

from research.models.registry import build_model, model_names, register_model

__all__ = ["build_model", "register_model", "model_names"]
