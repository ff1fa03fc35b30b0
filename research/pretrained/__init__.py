"""Converters from released weights in local folders (diffusers / transformers, safetensors) to runs."""
