"""Load released Hugging Face CLIP weights (a local CLIPModel or CLIPTextModel folder) into research.models.clip,
without torch.

    python -m research.pretrained.convert_clip --hf DIR      # prints the parameter count and the sha256

DIR is what transformers' `save_pretrained` writes (config.json and model.safetensors, or shards listed in
model.safetensors.index.json); nothing is downloaded. Tensors are read with the safetensors package's numpy API;
bfloat16 tensors, which it cannot represent, are decoded from their bytes (the high half of a float32).

    fields, params = load_hf_clip(DIR)            # CLIP(**fields).apply({'params': params}, images, tokens)
    fields, params = load_hf_clip_text(DIR)       # CLIPTextTransformer(**fields), e.g. Stable Diffusion's text_encoder/
    folder = read_hf_folder(DIR); folder.sha256   # the same loaders accept the HFFolder, so a run records its hash

Keys are matched by the file's own prefixes: the text tower is wherever `embeddings.token_embedding.weight` is
(`text_model.` in CLIPModel files, older CLIPTextModel files and Stable Diffusion's; none in CLIPTextModel files
written by transformers >= 5.6), the image tower wherever `embeddings.class_embedding` is. The key of every
parameter is listed in research/models/clip.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Dict, NamedTuple, Tuple

import numpy as np

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class ConversionError(ValueError):
    """A folder that cannot be loaded as the requested model; the message names the file, tensor or field."""


class HFFolder(NamedTuple):
    """A Hugging Face model folder as read: config.json, every tensor (float32 numpy), and the sha256 of the
    weight files' bytes concatenated in the order read (shard names sorted; for a single file this is
    `sha256sum model.safetensors`)."""

    path: str
    config: dict
    tensors: Dict[str, np.ndarray]
    sha256: str
    files: Tuple[str, ...]


def _weight_files(folder: str) -> Tuple[str, ...]:
    index = os.path.join(folder, INDEX)
    if os.path.isfile(os.path.join(folder, WEIGHTS)):
        return (WEIGHTS,)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise ConversionError(f"{index} is not a safetensors index (no readable weight_map: {e})") from None
        return tuple(sorted(set(weight_map.values())))
    hint = (
        " (pytorch_model.bin is a torch pickle: re-save with safe_serialization=True)"
        if os.path.isfile(os.path.join(folder, "pytorch_model.bin"))
        else ""
    )
    raise ConversionError(f"{folder} has no {WEIGHTS} or {INDEX}{hint}")


def _safetensors_header(path: str) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _read_tensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors import safe_open

    out, bf16 = {}, []
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            if f.get_slice(name).get_dtype() == "BF16":
                bf16.append(name)
            else:
                out[name] = np.asarray(f.get_tensor(name), np.float32)
    if bf16:
        header, start = _safetensors_header(path)
        with open(path, "rb") as f:
            for name in bf16:
                begin, end = header[name]["data_offsets"]
                f.seek(start + begin)
                bits = np.frombuffer(f.read(end - begin), "<u2").astype(np.uint32) << 16
                out[name] = bits.view(np.float32).reshape(header[name]["shape"])
    return out


def read_hf_folder(folder: str) -> HFFolder:
    """config.json and all tensors of a Hugging Face safetensors folder, with the weights' sha256."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder} is not a folder; give the folder save_pretrained wrote")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{cfg_path} is missing: give a folder written by transformers' save_pretrained")
    with open(cfg_path) as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise ConversionError(f"{cfg_path} is not valid JSON ({e})") from None
    files = _weight_files(folder)
    digest, tensors = hashlib.sha256(), {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ConversionError(f"{path} is listed in {INDEX} but missing")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        try:
            tensors.update(_read_tensors(path))
        except Exception as e:  # the safetensors parser raises its own error types for a corrupt file
            raise ConversionError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return HFFolder(folder, config, tensors, digest.hexdigest(), files)


def _as_folder(folder) -> HFFolder:
    return folder if isinstance(folder, HFFolder) else read_hf_folder(folder)


# --- config.json -> model fields ------------------------------------------------------------------------------------

_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_ACTS = ("quick_gelu", "gelu")


def _sub_config(config: dict, key: str, defaults: dict) -> dict:
    # transformers' defaults for keys an older config.json omits; `<key>_dict` overrides `<key>` as in CLIPConfig.
    return {**defaults, **(config.get(key) or {}), **(config.get(key + "_dict") or {})}


def _check_act(where: str, act) -> str:
    if act not in _ACTS:
        raise ConversionError(f"{where}hidden_act={act!r} is not supported; CLIP uses one of {_ACTS}")
    return act


def _square(where: str, value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"{where}{name}={value}: only square sizes are supported")
        value = value[0]
    return int(value)


def text_fields_from_config(text: dict) -> dict:
    """CLIPTextTransformer fields of a (complete) transformers CLIPTextConfig dict."""
    eos = text["eos_token_id"]
    if not isinstance(eos, int):
        raise ConversionError(f"text config eos_token_id={eos!r}: expected one integer")
    return dict(
        vocab_size=int(text["vocab_size"]),
        context_length=int(text["max_position_embeddings"]),
        width=int(text["hidden_size"]),
        layers=int(text["num_hidden_layers"]),
        heads=int(text["num_attention_heads"]),
        mlp_dim=int(text["intermediate_size"]),
        act=_check_act("text config ", text["hidden_act"]),
        eos_token_id=eos,
        layer_norm_eps=float(text["layer_norm_eps"]),
    )


def clip_fields_from_config(config: dict) -> Tuple[dict, int]:
    """(CLIP fields, image channels) of a transformers CLIPConfig dict (config.json of a CLIPModel)."""
    if config.get("model_type") in ("clip_text_model", "clip_vision_model") or "text_config" not in config:
        raise ConversionError(
            f"config.json has model_type={config.get('model_type')!r} without text_config/vision_config: not a "
            "CLIPModel (use load_hf_clip_text for a CLIPTextModel folder)"
        )
    text = text_fields_from_config(_sub_config(config, "text_config", _TEXT_DEFAULTS))
    vision = _sub_config(config, "vision_config", _VISION_DEFAULTS)
    vision_act = _check_act("vision_config.", vision["hidden_act"])
    if vision_act != text["act"]:
        raise ConversionError(f"text hidden_act={text['act']!r} != vision hidden_act={vision_act!r}: not supported")
    if float(vision["layer_norm_eps"]) != text["layer_norm_eps"]:
        raise ConversionError(
            f"text layer_norm_eps={text['layer_norm_eps']} != vision layer_norm_eps={vision['layer_norm_eps']}"
        )
    fields = dict(
        embed_dim=int(config.get("projection_dim", 512)),
        image_size=_square("vision_config.", vision["image_size"], "image_size"),
        patch_size=_square("vision_config.", vision["patch_size"], "patch_size"),
        vision_width=int(vision["hidden_size"]),
        vision_layers=int(vision["num_hidden_layers"]),
        vision_heads=int(vision["num_attention_heads"]),
        vision_mlp_dim=int(vision["intermediate_size"]),
        vocab_size=text["vocab_size"],
        context_length=text["context_length"],
        text_width=text["width"],
        text_layers=text["layers"],
        text_heads=text["heads"],
        text_mlp_dim=text["mlp_dim"],
        act=text["act"],
        eos_token_id=text["eos_token_id"],
        layer_norm_eps=text["layer_norm_eps"],
        logit_scale_init=float(config.get("logit_scale_init_value", 2.6592)),
    )
    return fields, int(vision["num_channels"])


# --- state_dict -> parameter tree -----------------------------------------------------------------------------------

# kind: how a torch tensor becomes our leaf; _TO_TORCH_SHAPE inverts it to report the shape the file should have.
_CONVERT = {
    "copy": lambda a: a,
    "linear": lambda a: a.T,  # [out, in] -> [in, out]
    "conv": lambda a: np.transpose(a, (2, 3, 1, 0)),  # [O, I, kh, kw] -> [kh, kw, I, O]
}
_TO_TORCH_SHAPE = {
    "copy": lambda s: tuple(s),
    "linear": lambda s: tuple(s[::-1]),
    "conv": lambda s: (s[3], s[2], s[0], s[1]),
}


def _blocks(hf: str, ours: tuple, layers: int):
    for i in range(layers):
        src, dst = f"{hf}encoder.layers.{i}.", ours + (f"block_{i}",)
        for a, b in (("layer_norm1", "ln1"), ("layer_norm2", "ln2")):
            yield f"{src}{a}.weight", dst + (b, "scale"), "copy"
            yield f"{src}{a}.bias", dst + (b, "bias"), "copy"
        for a, b in (
            ("self_attn.q_proj", "q"),
            ("self_attn.k_proj", "k"),
            ("self_attn.v_proj", "v"),
            ("self_attn.out_proj", "out"),
            ("mlp.fc1", "fc1"),
            ("mlp.fc2", "fc2"),
        ):
            yield f"{src}{a}.weight", dst + (b, "kernel"), "linear"
            yield f"{src}{a}.bias", dst + (b, "bias"), "copy"


def _text_keys(hf: str, ours: tuple, layers: int):
    yield f"{hf}embeddings.token_embedding.weight", ours + ("token_embedding", "embedding"), "copy"
    yield f"{hf}embeddings.position_embedding.weight", ours + ("position_embedding",), "copy"
    yield from _blocks(hf, ours, layers)
    yield f"{hf}final_layer_norm.weight", ours + ("final_norm", "scale"), "copy"
    yield f"{hf}final_layer_norm.bias", ours + ("final_norm", "bias"), "copy"


def _vision_keys(hf: str, ours: tuple, layers: int):
    yield f"{hf}embeddings.class_embedding", ours + ("class_embedding",), "copy"
    yield f"{hf}embeddings.patch_embedding.weight", ours + ("patch_embed", "kernel"), "conv"
    yield f"{hf}embeddings.position_embedding.weight", ours + ("position_embedding",), "copy"
    for a, b in (("pre_layrnorm", "pre_norm"), ("post_layernorm", "post_norm")):
        yield f"{hf}{a}.weight", ours + (b, "scale"), "copy"
        yield f"{hf}{a}.bias", ours + (b, "bias"), "copy"
    yield from _blocks(hf, ours, layers)


def _prefix(folder: HFFolder, suffix: str, tower: str) -> str:
    found = sorted(k[: -len(suffix)] for k in folder.tensors if k.endswith(suffix))
    if not found:
        raise ConversionError(f"{folder.path} has no {tower} tower: no tensor named '[prefix]{suffix}'")
    if len(found) > 1:
        raise ConversionError(f"{folder.path} has several {tower} towers (prefixes {found}); expected one")
    return found[0]


def _ignored(key: str) -> bool:
    # Non-persistent position-id buffers that older transformers versions wrote into the files.
    return key.endswith("embeddings.position_ids")


def _port(folder: HFFolder, mapping, expected: dict) -> dict:
    """Our parameter tree from folder.tensors by `mapping` (hf key, our path, kind), checked against `expected`
    (our path -> shape, from the architecture config.json describes)."""
    params, used = {}, set()
    for key, path, kind in mapping:
        if key not in folder.tensors:
            raise ConversionError(f"tensor {key!r} is missing from {folder.path} (config.json's architecture needs it)")
        array, want = folder.tensors[key], _TO_TORCH_SHAPE[kind](expected[path])
        if tuple(array.shape) != want:
            raise ConversionError(
                f"tensor {key!r} has shape {tuple(array.shape)} in {folder.path}; config.json implies {want}"
            )
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.array(_CONVERT[kind](array), np.float32, order="C")  # ascontiguousarray makes 0-d 1-d
        used.add(key)
    unfilled = sorted(set(expected) - {p for _, p, _ in mapping})
    if unfilled:  # a bug here, not in the folder: the mapping must cover the model
        raise AssertionError(f"convert_clip mapping misses parameters {unfilled[:3]}")
    leftover = sorted(k for k in folder.tensors if k not in used and not _ignored(k))
    if leftover:
        raise ConversionError(
            f"{folder.path} has {len(leftover)} tensor(s) this model does not use, e.g. {leftover[:3]}: the folder "
            "is not this kind of model, or config.json does not describe its weights"
        )
    return params


def _shapes(module, *inputs) -> dict:
    import jax
    from flax.traverse_util import flatten_dict

    tree = jax.eval_shape(lambda *xs: module.init(jax.random.PRNGKey(0), *xs), *inputs)["params"]
    return {k: tuple(v.shape) for k, v in flatten_dict(tree).items()}


def load_hf_clip(folder) -> Tuple[dict, dict]:
    """(CLIP fields, params) of a transformers CLIPModel folder (or an HFFolder read from one).

    CLIP(**fields).apply({'params': params}, images [B, H, W, C], tokens [B, L]) then equals CLIPModel's
    get_image_features / get_text_features (pixel_values transposed to NHWC). params are float32 numpy arrays.
    """
    import jax
    import jax.numpy as jnp

    from research.models.clip import CLIP

    folder = _as_folder(folder)
    fields, channels = clip_fields_from_config(folder.config)
    text = _prefix(folder, "embeddings.token_embedding.weight", "text")
    vision = _prefix(folder, "embeddings.class_embedding", "vision")
    mapping = list(_text_keys(text, ("text",), fields["text_layers"]))
    mapping += list(_vision_keys(vision, ("vision",), fields["vision_layers"]))
    mapping += [
        ("visual_projection.weight", ("image_projection", "kernel"), "linear"),
        ("text_projection.weight", ("text_projection", "kernel"), "linear"),
        ("logit_scale", ("logit_scale",), "copy"),
    ]
    size = fields["image_size"]
    expected = _shapes(
        CLIP(**fields),
        jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32),
        jax.ShapeDtypeStruct((1, fields["context_length"]), jnp.int32),
    )
    return fields, _port(folder, mapping, expected)


def load_hf_clip_text(folder) -> Tuple[dict, dict]:
    """(CLIPTextTransformer fields, params) of a transformers CLIPTextModel folder (e.g. Stable Diffusion's
    text_encoder/), keys with or without the `text_model.` prefix; a CLIPModel folder's text tower also loads if
    its vision tower and projections are not there (they would be reported as unused)."""
    import jax
    import jax.numpy as jnp

    from research.models.clip import CLIPTextTransformer

    folder = _as_folder(folder)
    config = folder.config
    if "text_config" in config and config.get("model_type") != "clip_text_model":
        config = config["text_config"]
    fields = text_fields_from_config({**_TEXT_DEFAULTS, **config})
    prefix = _prefix(folder, "embeddings.token_embedding.weight", "text")
    expected = _shapes(CLIPTextTransformer(**fields), jax.ShapeDtypeStruct((1, fields["context_length"]), jnp.int32))
    return fields, _port(folder, list(_text_keys(prefix, (), fields["layers"])), expected)


def main(argv=None) -> int:
    from research.cli import ArgumentParser, UsageError, fail

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="transformers CLIPModel or CLIPTextModel folder (save_pretrained)")
    try:
        args = p.parse_args(argv)
    except UsageError as e:
        return fail(e)
    try:
        folder = read_hf_folder(args.hf)
        text_only = "text_config" not in folder.config or folder.config.get("model_type") == "clip_text_model"
        fields, params = (load_hf_clip_text if text_only else load_hf_clip)(folder)
    except (OSError, ConversionError) as e:
        return fail(e)
    from research.models.clip import count_params

    kind = "CLIPTextTransformer" if text_only else "CLIP"
    files = ", ".join(folder.files)
    print(f"{args.hf}: {kind} with {count_params(params):,} parameters; sha256 {folder.sha256} ({files})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
