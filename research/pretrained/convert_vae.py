"""Import a diffusers-format KL autoencoder (e.g. a local copy of Stable Diffusion's VAE) as an autoencoder workdir.

    python -m research.pretrained.convert_vae --diffusers DIR --workdir runs/autoencoder_f8_imagenet256 \
        --image-size 256 [--data-name tfds --tfds-name imagenet2012] [--scale 0.18215]

DIR is a folder written by diffusers' `AutoencoderKL.save_pretrained` (config.json and
diffusion_pytorch_model.safetensors; no network access, nothing is downloaded). The result is a workdir like
the one `python -m research.train --config configs/vae_mnist.py` writes: config.json (task='autoencoder', the
architecture read from DIR, the pixel data it is meant for), an orbax checkpoint at step 0 with the weights as
both the raw and the EMA parameters, and latent_scale.json holding the model's scaling_factor (or --scale), so
`latent.autoencoder=WORKDIR` in a diffusion config (configs/dit_xl2_imagenet256.py) trains on its latents.

The safetensors file is parsed here (an 8-byte header length, a JSON header, raw little-endian tensors), so the
import needs neither torch nor the safetensors package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict

import numpy as np

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """name -> float32 array of a .safetensors file (F32, F16, BF16 or F64 tensors)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":  # the high half of a float32
            bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            array = np.frombuffer(raw, np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; expected floating point")
        out[name] = np.asarray(array, np.float32).reshape(info["shape"])
    return out


def model_fields(diffusers_config: dict) -> dict:
    """config.model fields of our AutoencoderKL ('vae') for a diffusers AutoencoderKL config."""
    c = diffusers_config
    for key in ("down_block_types", "up_block_types"):
        kinds = set(c.get(key, ()))
        allowed = {"DownEncoderBlock2D"} if key == "down_block_types" else {"UpDecoderBlock2D"}
        if not kinds <= allowed:
            raise ValueError(
                f"{key}={sorted(kinds)}: only the plain KL autoencoder layout ({sorted(allowed)}) is supported"
            )
    if (
        not c.get("mid_block_add_attention", True)
        or c.get("use_quant_conv", True) is False
        or c.get("use_post_quant_conv", True) is False
    ):
        raise ValueError("autoencoders without mid-block attention or (post-)quant convolutions are not supported")
    if c.get("in_channels", 3) != c.get("out_channels", 3):
        raise ValueError(f"in_channels={c.get('in_channels')} != out_channels={c.get('out_channels')}")
    chans = list(c["block_out_channels"])
    ch = chans[0]
    if any(x % ch for x in chans):
        raise ValueError(f"block_out_channels={chans} are not multiples of the first")
    return dict(
        name="vae",
        ch=ch,
        ch_mult=tuple(x // ch for x in chans),
        num_res_blocks=int(c["layers_per_block"]),
        z_channels=int(c["latent_channels"]),
        attn_resolutions=(),
        num_heads=1,
        dropout=0.0,
        resamp_with_conv=True,
        norm_groups=int(c.get("norm_num_groups", 32)),
        norm_eps=1e-6,
        dtype="float32",
    )


def port_state_dict(sd: Dict[str, np.ndarray], levels: int, blocks: int) -> dict:
    """diffusers AutoencoderKL state dict (numpy, NCHW/OIHW) -> our parameter tree (HWIO kernels)."""
    conv = lambda p: {"kernel": np.transpose(sd[p + ".weight"], (2, 3, 1, 0)), "bias": sd[p + ".bias"]}
    norm = lambda p: {"scale": sd[p + ".weight"], "bias": sd[p + ".bias"]}

    def dense(p):
        w = sd[p + ".weight"]
        return {"kernel": w.reshape(w.shape[:2]).T, "bias": sd[p + ".bias"]}

    def res(p):
        out = {
            "norm1": norm(p + ".norm1"),
            "conv1": conv(p + ".conv1"),
            "norm2": norm(p + ".norm2"),
            "conv2": conv(p + ".conv2"),
        }
        if p + ".conv_shortcut.weight" in sd:
            out["skip"] = dense(p + ".conv_shortcut")
        return out

    def attn(p):
        q, k, v = (dense(f"{p}.{n}") for n in ("to_q", "to_k", "to_v"))
        qkv = {
            "kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], 1),
            "bias": np.concatenate([q["bias"], k["bias"], v["bias"]]),
        }
        return {"norm": norm(p + ".group_norm"), "qkv": qkv, "proj_out": dense(p + ".to_out.0")}

    def mid(p):
        return {
            "mid_res0": res(p + ".resnets.0"),
            "mid_attn": attn(p + ".attentions.0"),
            "mid_res1": res(p + ".resnets.1"),
        }

    enc = {
        "conv_in": conv("encoder.conv_in"),
        "norm_out": norm("encoder.conv_norm_out"),
        "conv_out": conv("encoder.conv_out"),
        **mid("encoder.mid_block"),
    }
    dec = {
        "conv_in": conv("decoder.conv_in"),
        "norm_out": norm("decoder.conv_norm_out"),
        "conv_out": conv("decoder.conv_out"),
        **mid("decoder.mid_block"),
    }
    for level in range(levels):
        for b in range(blocks):
            enc[f"down{level}_res{b}"] = res(f"encoder.down_blocks.{level}.resnets.{b}")
        if level != levels - 1:
            enc[f"down{level}_down"] = {"conv": conv(f"encoder.down_blocks.{level}.downsamplers.0.conv")}
        up = levels - 1 - level  # diffusers numbers the decoder blocks from the bottom
        for b in range(blocks + 1):
            dec[f"up{level}_res{b}"] = res(f"decoder.up_blocks.{up}.resnets.{b}")
        if level != 0:
            dec[f"up{level}_up"] = {"conv": conv(f"decoder.up_blocks.{up}.upsamplers.0.conv")}
    tree = {
        "encoder": enc,
        "decoder": dec,
        "quant_conv": conv("quant_conv"),
        "post_quant_conv": conv("post_quant_conv"),
    }
    return _map(lambda a: np.ascontiguousarray(a, np.float32), tree)


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def read_diffusers_autoencoder(directory: str) -> tuple:
    """(model fields, parameter tree, scaling_factor) of a diffusers AutoencoderKL folder."""
    cfg_path = os.path.join(directory, "config.json")
    weights = os.path.join(directory, "diffusion_pytorch_model.safetensors")
    for path in (cfg_path, weights):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: DIR must be a diffusers AutoencoderKL folder (save_pretrained with safetensors)"
            )
    with open(cfg_path) as f:
        dconfig = json.load(f)
    fields = model_fields(dconfig)
    params = port_state_dict(read_safetensors(weights), len(fields["ch_mult"]), fields["num_res_blocks"])
    return fields, params, float(dconfig.get("scaling_factor", 0.18215)), int(dconfig.get("in_channels", 3))


def write_autoencoder_workdir(
    workdir: str,
    fields: dict,
    params: Any,
    scale: float,
    *,
    image_size: int,
    channels: int,
    data: dict | None = None,
    source: str = "",
) -> str:
    """A workdir that research.latents.load_autoencoder (and latent.autoencoder) reads: config.json, an orbax
    checkpoint at step 0 (params = EMA params = the given weights) and latent_scale.json with `scale`."""
    import jax
    import ml_collections

    from research.config import base_config
    from research.latents import write_latent_scale
    from research.run import write_run_files
    from research.tasks import validate_config
    from research.train.checkpoint import Checkpointer
    from research.train.loop import build_trainer

    config = base_config()
    config.task = "autoencoder"
    config.model = ml_collections.ConfigDict(fields)
    config.data.image_size, config.data.channels = int(image_size), int(channels)
    for key, value in (data or {}).items():
        config.data[key] = value
    config.train.num_steps = 1
    validate_config(config)
    trainer = build_trainer(config)
    state = trainer.init(jax.random.PRNGKey(0))
    have = {k: v.shape for k, v in _flat(jax.device_get(state.params["net"])).items()}
    got = {k: v.shape for k, v in _flat(params).items()}
    if have != got:
        diff = sorted(set(have.items()) ^ set(got.items()))[:4]
        raise ValueError(f"the ported weights do not fit the architecture read from the config: {diff}")
    placed = jax.device_put(params, trainer.state_sharding.params["net"])
    state = state.replace(params={"net": placed}, ema_params={"net": placed})
    workdir = os.path.abspath(workdir)
    write_run_files(config, workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
    ckpt.save(0, state, {}, trainer.meta)
    ckpt.wait()
    ckpt.close()
    entry = {"scale": float(scale), "step": 0, "statistic": f"given ({source or 'imported'})"}
    for use_ema in (True, False):
        write_latent_scale(workdir, 0, entry, use_ema)
    return workdir


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def main(argv=None) -> int:
    from research.cli import ArgumentParser, UsageError, fail, positive_float, positive_int

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers", required=True, help="diffusers AutoencoderKL folder (save_pretrained)")
    p.add_argument("--workdir", required=True, help="autoencoder workdir to write")
    p.add_argument(
        "--image-size", type=positive_int, required=True, help="pixel size the latent diffusion runs will use"
    )
    p.add_argument("--data-name", default="tfds", help="data.name of those runs (checked against theirs)")
    p.add_argument("--tfds-name", default="", help="data.tfds_name, with --data-name tfds")
    p.add_argument(
        "--scale", type=positive_float, default=None, help="latent scale (default: the config's scaling_factor)"
    )
    try:
        args = p.parse_args(argv)
        if not os.path.exists(args.diffusers):
            raise UsageError(f"--diffusers {args.diffusers} does not exist")
        if not os.path.isdir(args.diffusers):
            raise UsageError(
                f"--diffusers {args.diffusers} is a file; give the folder AutoencoderKL.save_pretrained "
                "wrote (config.json + diffusion_pytorch_model.safetensors)"
            )
        if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
            raise UsageError(f"--workdir {args.workdir} is a file; give a new folder")
        if os.path.isdir(args.workdir) and os.listdir(args.workdir):
            raise UsageError(f"--workdir {args.workdir} is not empty; give a new folder (or remove it)")
    except UsageError as e:
        return fail(e)
    try:
        try:
            fields, params, scaling_factor, channels = read_diffusers_autoencoder(args.diffusers)
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            # A malformed safetensors header or config: the parsers index into what they read.
            raise ValueError(
                f"{args.diffusers} is not a readable diffusers AutoencoderKL folder ({type(e).__name__}: {e})"
            ) from None
        scale = scaling_factor if args.scale is None else args.scale
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"the config's scaling_factor is {scale}; give a positive --scale")
        workdir = write_autoencoder_workdir(
            args.workdir,
            fields,
            params,
            scale,
            image_size=args.image_size,
            channels=channels,
            data={"name": args.data_name, "tfds_name": args.tfds_name},
            source=f"{os.path.abspath(args.diffusers)}, scaling_factor",
        )
    except (OSError, ValueError) as e:
        return fail(e)
    f = 2 ** (len(fields["ch_mult"]) - 1)
    print(
        f"wrote {workdir}: f{f}, {fields['z_channels']} latent channels, scale {scale:g}; use it with "
        f"--config.latent.autoencoder={workdir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
