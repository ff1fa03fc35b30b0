"""Config -> shapes: what the network sees and emits, decided from the config alone (no weights are read).

A latent diffusion config (latent.autoencoder set) describes pixels in config.data; its network sees the
autoencoder's latents [H/f, W/f, z]. f and z come from latent.downsample_factor / latent.channels when declared,
else from the autoencoder run's config.json.
"""

from __future__ import annotations

from research.config import ConfigError
from research.run import read_config


def latent_enabled(config) -> bool:
    return bool("latent" in config and config.latent.autoencoder)


def autoencoder_geometry(workdir: str) -> tuple:
    """(downsample factor, latent channels, pixel data section) of an autoencoder workdir, from its config.json."""
    try:
        ae_config = read_config(workdir)
    except ConfigError:
        raise ConfigError(
            f"latent.autoencoder={workdir!r} has no config.json: train one first (e.g. python -m "
            f"research.train --config configs/vae_mnist.py --workdir {workdir}), or declare "
            f"latent.downsample_factor and latent.channels to inspect the config without it"
        ) from None
    if ae_config.model.name != "vae":
        raise ConfigError(f"latent.autoencoder={workdir!r} is a {ae_config.task!r} run, not an autoencoder")
    return 2 ** (len(ae_config.model.ch_mult) - 1), int(ae_config.model.z_channels), ae_config.data


def latent_geometry(config) -> tuple:
    """(f, z_channels): the declared latent.downsample_factor / latent.channels, else the autoencoder's."""
    lat = config.latent
    f, z = int(lat.downsample_factor), int(lat.channels)
    if f and z:
        return f, z
    af, az, _ = autoencoder_geometry(lat.autoencoder)
    return f or af, z or az


def data_shape(config) -> tuple:
    d = config.data
    return (int(d.image_size), int(d.image_size), int(d.channels))


def model_input_shape(config) -> tuple:
    """(H, W, C) the network sees: the pixel data's, or its autoencoder latents' (H/f, W/f, z)."""
    d = config.data
    if not latent_enabled(config):
        return data_shape(config)
    f, z = latent_geometry(config)
    if d.image_size % f:
        raise ConfigError(
            f"data.image_size={d.image_size} is not divisible by the autoencoder's downsampling factor {f}"
        )
    return (d.image_size // f, d.image_size // f, z)


def output_channels(config) -> int:
    """Channels of the network's output: the input's, doubled for a learned variance (iDDPM's learned_range)."""
    doubled = config.diffusion.var_type == "learned_range" and config.model.name != "vae"
    return model_input_shape(config)[2] * (2 if doubled else 1)


def build_network(config):
    """The Flax module of a config's main network ('net'), sized by this module."""
    from research.models import build_model

    try:
        return build_model(config.model, out_channels=output_channels(config))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def example_cond(config, batch: int = 1):
    """The Cond a network of this config is initialised with (labels for a class-conditional model, zero text
    embeddings [batch, context_length, cross_attention_dim] for the text-conditional U-Net, plus a zero hint for a
    ControlNet)."""
    import jax.numpy as jnp

    from research.cond import Cond

    name = config.model.name
    cond = None
    if name in ("cond_unet", "cond_unet_controlnet"):  # text token embeddings [batch, L, D]
        length = int(config.model.get("context_length", 77))
        cond = Cond(text=jnp.zeros((batch, length, int(config.model.cross_attention_dim)), jnp.float32))
    elif config.model.get("num_classes", 0):
        cond = Cond(label=jnp.zeros((batch,), jnp.int32))
    if name.endswith("_controlnet"):  # a hint at model.hint_downsample times the network's resolution
        h, w, _ = model_input_shape(config)
        f, c = int(config.model.get("hint_downsample", 1)), int(config.model.get("conditioning_channels", 0) or 1)
        cond = (cond or Cond()).replace(hint=jnp.zeros((batch, h * f, w * f, c), jnp.float32))
    return cond


def example_tokens(config, batch: int = 1):
    """Token ids [batch, model.context_length] a text model is initialised (and summarised) with."""
    import jax.numpy as jnp

    return jnp.zeros((batch, int(config.model.context_length)), jnp.int32)


def init_net_params(model, config, key):
    """Initial parameters of the main network (the autoencoder's model is initialised from images alone)."""
    import jax.numpy as jnp

    x = jnp.zeros((1, *model_input_shape(config)), jnp.float32)
    if config.model.name == "vae":
        return model.init(key, x)["params"]
    if config.model.name == "clip":  # images and captions
        return model.init(key, x, example_tokens(config))["params"]
    return model.init(key, x, jnp.zeros((1,), jnp.int32), example_cond(config))["params"]


def abstract_net_params(model, config):
    """Parameter shapes without allocating them (jax.eval_shape)."""
    import jax

    return jax.eval_shape(lambda: init_net_params(model, config, jax.random.PRNGKey(0)))
