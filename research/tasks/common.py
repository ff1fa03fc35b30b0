"""What several tasks share: the main network's parameters, checkpoint metadata, and compiling a Trainer."""

from __future__ import annotations

import logging

import jax

from research.config import ConfigError
from research.models.registry import check_input_shape
from research.shapes import build_network, model_input_shape
from research.tasks import Trainer
from research.train import mesh as mesh_lib
from research.train.checkpoint import param_signature

log = logging.getLogger(__name__)


def validate_network(config) -> None:
    """The network builds from config.model and accepts the input the config gives it."""
    if config.model.name == "vae":
        raise ConfigError(
            f"task={config.task!r} with model.name='vae': an autoencoder is trained by task='autoencoder' (see "
            f"configs/vae_mnist.py); a denoising network is a 'unet' or a 'dit'"
        )
    height, width, channels = model_input_shape(config)
    build_network(config)
    what = (
        f"the {height}x{width}x{channels} latents of latent.autoencoder"
        if config.latent.autoencoder
        else f"data.image_size={config.data.image_size}"
    )
    try:
        check_input_shape(config.model, (height, width, channels))
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None
    if config.model.get("num_classes", 0) and config.model.num_classes != config.data.num_classes:
        raise ConfigError(
            f"model.num_classes={config.model.num_classes} but data.num_classes="
            f"{config.data.num_classes}; set them equal (or model.num_classes=0 for unconditional)"
        )


def model_meta(config, abstract_state) -> dict:
    """Checkpoint metadata: the signature of every trained part and the model section that built 'net'."""
    model_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.to_dict().items()}
    return {"params": param_signature(abstract_state.params), "model": model_cfg, "task": str(config.task)}


def compile_trainer(config, mesh, model, abstract_state, init, step_fn, meta, *, step_extra_args=()) -> Trainer:
    """jit init and step with the state's shardings (from train.sharding_rules) and the batch split over 'data'.
    step_fn None leaves trainer.step to the caller (a task that compiles one program per phase)."""
    try:
        state_sh = mesh_lib.state_shardings_from_config(mesh, abstract_state, config.train)
    except ValueError as e:
        raise ConfigError(f"train.sharding_rules: {e}") from None
    if mesh.devices.size > 1:
        log.info("%s", mesh_lib.describe_shardings(abstract_state, state_sh).splitlines()[-1])
    batch_sh = mesh_lib.batch_sharding(mesh)
    init_jit = jax.jit(init, out_shardings=state_sh)
    step_jit = None
    if step_fn is not None:
        step_jit = jax.jit(
            step_fn,
            in_shardings=(state_sh, batch_sh, *step_extra_args),
            out_shardings=(state_sh, None),
            donate_argnums=0,
        )
    return Trainer(
        model=model,
        mesh=mesh,
        abstract_state=abstract_state,
        state_sharding=state_sh,
        batch_sharding=batch_sh,
        init=init_jit,
        step=step_jit,
        meta=meta,
    )


def source_captions(config) -> bool:
    """Whether the run's data brings its own captions (an imagefolder, or TFDS with data.caption_key)."""
    name = config.data.name
    return name == "imagefolder" or (name == "tfds" and bool(config.data.caption_key))


def tokenizer_or_config_error(folder: str):
    """The CLIP tokenizer of `folder` ('' -> $RESEARCH_DATA_DIR/clip); a missing one is a one-line ConfigError."""
    from research.data import DataError
    from research.data.text import load_tokenizer

    try:
        return load_tokenizer(folder or None)
    except DataError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
