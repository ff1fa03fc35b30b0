"""A Stable Diffusion folder converted once into a workdir of this codebase, and read back.

    python -m research.pretrained.sd_workdir --diffusers PATH/stable-diffusion-v1-5 --workdir runs/sd15
    python -m research.generate --pretrained runs/sd15 --prompt "..." --out out/x     # reads the workdir

The workdir is a task='text_to_image' run like any other (research.run reads it, research.summary counts it):
  config.json          the U-Net (model.name='cond_unet' with the folder's fields), the text encoder
                       (text.width / layers / heads / mlp_dim / act, trained with the U-Net: part 'text'), the
                       diffusion schedule of the folder's scheduler (betas, T, prediction), latent.autoencoder =
                       WORKDIR/autoencoder, data.image_size = the folder's default size
  checkpoints/0        params = EMA params = {'net': U-Net, 'text': text encoder}, with optimizer state (so the
                       run resumes and fine-tunes like one trained here)
  autoencoder/         the VAE as a task='autoencoder' workdir with the folder's scaling_factor as its latent scale
  tokenizer/           the folder's tokenizer files, scheduler_config.json the folder's scheduler settings
  pretrained.json      what was read: the folder, the components' sha256, the exact text-encoder fields
Fine-tuning: a text_to_image run with train.init_from=WORKDIR (and the workdir's config.json as its config, e.g.
`--config WORKDIR/config.json`-style overrides of data and steps) starts from these weights; research.generate reads
such a run too (its weights, the converted workdir's scheduler and record).
read_sd_workdir(workdir) returns the same SDPipelineParts as read_diffusers_pipeline(folder), so research.generate
gives the same images from either (tested on a tiny random pipeline).

Memory: writing the checkpoint builds the run's full training state (parameters, EMA and Adam's two moments), about
4x the weights: 15 GB for Stable Diffusion 1.5 in float32.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from research.pretrained.convert_clip import ConversionError

PRETRAINED_JSON = "pretrained.json"
_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")


def sd_config(parts, workdir: str):
    """The text_to_image config of a converted folder (see the module docstring)."""
    import ml_collections

    from research.config import base_config

    sched = parts.scheduler_config
    beta = sched.get("beta_schedule", "linear")
    if sched.get("trained_betas") is not None or beta not in _SCHEDULES:
        raise ConversionError(
            f"scheduler: beta_schedule={beta!r} / trained_betas cannot be written as a diffusion section (supported: "
            f"{', '.join(_SCHEDULES)})"
        )
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ConversionError(f"scheduler: prediction_type={prediction!r} is not one of {', '.join(_PREDICTIONS)}")
    tf = parts.text_fields
    c = base_config()
    c.task = "text_to_image"
    unet = {k: v for k, v in parts.unet_fields.items() if k != "out_channels"}
    with c.unlocked():
        c.model = ml_collections.ConfigDict(dict(name="cond_unet", **unet, context_length=int(tf["context_length"])))
    c.text.encoder, c.text.tokenizer = "", os.path.join(workdir, "tokenizer")
    c.text.width, c.text.layers, c.text.heads = int(tf["width"]), int(tf["layers"]), int(tf["heads"])
    c.text.mlp_dim, c.text.act = int(tf.get("mlp_dim") or 0), str(tf["act"])
    c.text.context_length = int(tf["context_length"])
    c.text.output_layer, c.text.mask = int(parts.text_output_layer), False
    size = int(parts.unet_sample_size) * 2 ** (len(parts.vae_fields["ch_mult"]) - 1)
    c.data.name, c.data.image_size, c.data.channels, c.data.random_flip = "imagefolder", size, 3, False
    c.latent.autoencoder, c.latent.cache = os.path.join(workdir, "autoencoder"), False
    c.latent.downsample_factor = 2 ** (len(parts.vae_fields["ch_mult"]) - 1)
    c.latent.channels = int(parts.vae_fields["z_channels"])
    c.diffusion.schedule, c.diffusion.timesteps = _SCHEDULES[beta], int(sched.get("num_train_timesteps", 1000))
    c.diffusion.beta_start = float(sched.get("beta_start", 0.0001))
    c.diffusion.beta_end = float(sched.get("beta_end", 0.02))
    c.diffusion.prediction, c.diffusion.var_type, c.diffusion.loss = _PREDICTIONS[prediction], "fixed_small", "simple"
    c.sample.clip_x0 = False
    c.train.num_steps = 1
    return c


def write_sd_workdir(parts, workdir: str) -> str:
    """Convert SDPipelineParts (research.pretrained.convert_sd.read_diffusers_pipeline) into `workdir`."""
    import jax

    from research.pretrained.convert_sd import describe
    from research.pretrained.convert_vae import write_autoencoder_workdir
    from research.run import is_run, write_run_files
    from research.tasks import get_task, validate_config
    from research.train.checkpoint import Checkpointer
    from research.train.loop import build_trainer

    workdir = os.path.abspath(workdir)
    if is_run(workdir):
        raise ConversionError(f"{workdir} already holds a run; give a new --workdir")
    config = sd_config(parts, workdir)
    size = int(config.data.image_size)
    os.makedirs(os.path.join(workdir, "tokenizer"), exist_ok=True)
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(parts.tokenizer_folder, name)):
            shutil.copy(os.path.join(parts.tokenizer_folder, name), os.path.join(workdir, "tokenizer", name))
    with open(os.path.join(workdir, "scheduler_config.json"), "w") as f:
        json.dump(parts.scheduler_config, f, indent=1)
    write_autoencoder_workdir(
        config.latent.autoencoder,
        dict(name="vae", **{k: v for k, v in parts.vae_fields.items() if k != "out_channels"}),
        parts.vae_params,
        parts.scaling_factor,
        image_size=size,
        channels=3,
        source=f"{parts.folder} vae scaling_factor",
    )
    validate_config(config)
    config = get_task("text_to_image").resolve(config)
    trainer = build_trainer(config)
    state = trainer.init(jax.random.PRNGKey(0))
    params = {"net": parts.unet_params, "text": parts.text_params}
    have = jax.tree.map(lambda a: a.shape, jax.device_get(state.params))
    got = jax.tree.map(lambda a: a.shape, params)
    if have != got:
        raise ConversionError("the converted weights do not fit the network the workdir's config builds")
    placed = jax.device_put(params, trainer.state_sharding.params)
    state = state.replace(params=placed, ema_params=placed)
    write_run_files(config, workdir)
    meta = dict(trainer.meta, pretrained=describe(parts))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
    ckpt.save(0, state, {}, meta)
    ckpt.wait()
    ckpt.close()
    record = dict(
        describe(parts),
        text_fields=dict(parts.text_fields),
        unet_sample_size=int(parts.unet_sample_size),
        model_index=parts.model_index,
    )
    with open(os.path.join(workdir, PRETRAINED_JSON), "w") as f:
        json.dump(record, f, indent=1)
    return workdir


def sd_source(path: str):
    """The converted workdir behind `path`: path itself when it holds pretrained.json, else the run it was
    fine-tuned from (train.init_from, followed back); None when there is none."""
    seen = set()
    while path and os.path.isfile(os.path.join(path, "config.json")) and path not in seen:
        if os.path.isfile(os.path.join(path, PRETRAINED_JSON)):
            return path
        seen.add(path)
        try:
            with open(os.path.join(path, "config.json")) as f:
                path = (json.load(f).get("train") or {}).get("init_from") or ""
        except (OSError, ValueError):
            return None
    return None


def is_sd_workdir(path: str) -> bool:
    """A converted Stable Diffusion workdir, or a text_to_image run fine-tuned from one."""
    return sd_source(os.path.abspath(path)) is not None


def read_sd_workdir(workdir: str, step=None, use_ema: bool = True):
    """SDPipelineParts of a converted workdir (or of a text_to_image run fine-tuned from one) at `step` (newest)."""
    from research.latents import load_run_autoencoder
    from research.pretrained.convert_sd import SDPipelineParts
    from research.run import load_parts

    workdir = os.path.abspath(workdir)
    source = sd_source(workdir)
    if source is None:
        raise ConversionError(
            f"{workdir} is not a converted Stable Diffusion workdir (no {PRETRAINED_JSON}): convert a diffusers "
            f"folder with python -m research.pretrained.sd_workdir --diffusers DIR --workdir {workdir}"
        )
    with open(os.path.join(source, PRETRAINED_JSON)) as f:
        record = json.load(f)
    with open(os.path.join(source, "scheduler_config.json")) as f:
        scheduler = json.load(f)
    config, params, step = load_parts(workdir, step, parts=("net", "text"), use_ema=use_ema)
    unet_params, text_params = params["net"], params["text"]
    ae = load_run_autoencoder(config)
    unet_fields = {k: v for k, v in config.model.to_dict().items() if k not in ("name", "context_length", "dtype")}
    unet_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in unet_fields.items()}
    unet_fields["out_channels"] = int(unet_fields["in_channels"])
    text_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record["text_fields"].items()}
    vae_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in ae.config.model.to_dict().items()}
    vae_fields = {k: v for k, v in vae_fields.items() if k not in ("name", "dtype")}
    vae_fields["out_channels"] = int(ae.config.data.channels)
    return SDPipelineParts(
        unet_fields=unet_fields,
        unet_params=unet_params,
        text_fields=text_fields,
        text_params=text_params,
        text_output_layer=int(config.text.output_layer),
        vae_fields=vae_fields,
        vae_params=ae.params,
        scaling_factor=float(ae.scale),
        tokenizer_folder=config.text.tokenizer,
        scheduler_config=scheduler,
        unet_sample_size=int(record["unet_sample_size"]),
        model_index=record.get("model_index", {}),
        family=record.get("family", "custom"),
        sha256=dict(record["sha256"], checkpoint_step=str(step)),
        folder=workdir,
    )


def main(argv=None) -> int:
    from research.cli import ArgumentParser, UsageError, fail

    p = ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m research.pretrained.sd_workdir")
    p.add_argument("--diffusers", required=True, help="StableDiffusionPipeline folder (save_pretrained)")
    p.add_argument("--workdir", required=True, help="the new workdir")
    try:
        args = p.parse_args(argv)
        if not os.path.isdir(args.diffusers):
            raise UsageError(f"--diffusers {args.diffusers} is not a folder")
    except UsageError as e:
        return fail(e)
    from research.pretrained.convert_sd import read_diffusers_pipeline

    try:
        workdir = write_sd_workdir(read_diffusers_pipeline(args.diffusers), args.workdir)
    except ConversionError as e:
        return fail(e)
    print(f"wrote {workdir}: config.json, checkpoints/0 (U-Net + text encoder), autoencoder/, tokenizer/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
