"""Load a diffusers UNet2DConditionModel folder (Stable Diffusion's unet/) into research.models.cond_unet, without
torch.

    fields, params = load_diffusers_unet("stable-diffusion-v1-5/unet")
    CondUNet(**fields).apply({'params': params}, x, t, Cond(text=...))

The folder is what diffusers' save_pretrained writes: config.json and diffusion_pytorch_model.safetensors (the file
is parsed by research.pretrained.convert_vae.read_safetensors; float16 / bfloat16 weights become float32).
`fields` holds CondUNet's constructor arguments including out_channels and in_channels; for a config's model
section drop out_channels (the run derives it) and add name='cond_unet'.

The port walks the parameter tree CondUNet itself builds for those fields (abstract shapes only) and maps every
parameter path to its diffusers key with one renaming table (`diffusers_key`), so the architecture is written
once, in the model. Every key the model expects must be present with its shape, and the file must hold no other
tensor; anything else is a ConversionError naming the tensor.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Tuple

import numpy as np

from research.pretrained.convert_clip import ConversionError

WEIGHTS = "diffusion_pytorch_model.safetensors"

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config keys whose value must be the one Stable Diffusion uses (a missing key takes diffusers' default,
# which is that value). Anything else changes the architecture in a way CondUNet does not implement.
_FIXED = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# Keys read below, and keys without effect on the weights or on float32 numerics: upcast_attention only makes
# diffusers compute attention logits in float32, which research.models.layers.attention always does; the
# addition-embedding head count is unused without an addition embedding.
_READ = {
    "in_channels",
    "out_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "dropout",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
}
_IGNORED = {"sample_size", "upcast_attention", "addition_embed_type_num_heads"}


def _unsupported(key, value, why: str = "") -> ConversionError:
    return ConversionError(
        f"unet config {key}={value!r} is not supported by CondUNet{': ' + why if why else ''} "
        f"(only Stable Diffusion 1.x / 2.x U-Nets convert)"
    )


def _int_or_tuple(config: dict, key: str, default):
    value = config.get(key, default)
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise _unsupported(key, value, "expected an int or a list of ints")


def unet_fields_from_config(config: dict) -> dict:
    """diffusers unet/config.json -> CondUNet constructor arguments (with out_channels and in_channels).

    Raises ConversionError naming the key and value of any setting CondUNet does not implement.
    """
    for key, value in config.items():
        if key.startswith("_") or key in _READ or key in _IGNORED:
            continue
        if key not in _FIXED:
            raise _unsupported(key, value, "unknown setting")
        values = value if isinstance(value, list) and key == "only_cross_attention" else [value]
        if any(v != _FIXED[key] for v in values) and not (key == "mid_block_only_cross_attention" and value is False):
            raise _unsupported(key, value, f"only {_FIXED[key]!r} is implemented")
    down = list(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    for key, kinds, allowed in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        bad = [k for k in kinds if k not in allowed]
        if bad:
            raise _unsupported(key, kinds, f"block type {bad[0]} (supported: {', '.join(allowed)})")
    cross = tuple(k == "CrossAttnDownBlock2D" for k in down)
    if tuple(k == "CrossAttnUpBlock2D" for k in reversed(up)) != cross:
        raise _unsupported("up_block_types", up, f"the decoder must mirror down_block_types={down}")
    channels = tuple(int(c) for c in config.get("block_out_channels", (320, 640, 1280, 1280)))
    if len(channels) != len(down):
        raise _unsupported("block_out_channels", list(channels), f"needs one entry per block of {down}")
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise _unsupported("layers_per_block", layers, "per-level counts are not implemented; give an int")
    cross_dim = config.get("cross_attention_dim", 1280)
    if not isinstance(cross_dim, int):
        raise _unsupported("cross_attention_dim", cross_dim, "per-level dimensions are not implemented")
    groups = config.get("norm_num_groups", 32)
    if groups is None:
        raise _unsupported("norm_num_groups", groups, "the U-Net needs GroupNorm")
    fields = dict(
        out_channels=int(config.get("out_channels", 4)),
        in_channels=int(config.get("in_channels", 4)),
        block_out_channels=channels,
        layers_per_block=int(layers),
        cross_attention_levels=cross,
        attention_head_dim=_int_or_tuple(config, "attention_head_dim", 8),
        num_attention_heads=_int_or_tuple(config, "num_attention_heads", None),
        cross_attention_dim=int(cross_dim),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        transformer_layers_per_block=_int_or_tuple(config, "transformer_layers_per_block", 1),
        norm_num_groups=int(groups),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
        freq_shift=float(config.get("freq_shift", 0)),
        dropout=float(config.get("dropout", 0.0)),
    )
    if fields["in_channels"] < 1:
        raise _unsupported("in_channels", fields["in_channels"], "must be a positive channel count")
    try:
        from research.models.cond_unet import CondUNet

        CondUNet(**fields).level_settings()
    except ValueError as e:
        raise ConversionError(f"unet config: {e}") from None
    return fields


# One row per parameter-path segment of CondUNet: (our segment, diffusers key fragment). {0}, {1} are the segment's
# numbers; {up} is diffusers' index of a decoder block, which it counts from the bottom.
_TABLE = (
    (r"time_dense0", "time_embedding.linear_1"),
    (r"time_dense1", "time_embedding.linear_2"),
    (r"down(\d+)_res(\d+)", "down_blocks.{0}.resnets.{1}"),
    (r"down(\d+)_attn(\d+)", "down_blocks.{0}.attentions.{1}"),
    (r"down(\d+)_down", "down_blocks.{0}.downsamplers.0.conv"),
    (r"mid_res(\d+)", "mid_block.resnets.{0}"),
    (r"mid_attn", "mid_block.attentions.0"),
    (r"up(\d+)_res(\d+)", "up_blocks.{up}.resnets.{1}"),
    (r"up(\d+)_attn(\d+)", "up_blocks.{up}.attentions.{1}"),
    (r"up(\d+)_up", "up_blocks.{up}.upsamplers.0"),
    (r"norm_out", "conv_norm_out"),
    (r"emb_proj", "time_emb_proj"),
    (r"skip", "conv_shortcut"),
    (r"block(\d+)", "transformer_blocks.{0}"),
    (r"to_out", "to_out.0"),
    (r"ff_in", "ff.net.0.proj"),
    (r"ff_out", "ff.net.2"),
    (r"kernel|scale", "weight"),
    # ControlNet (research.models.controlnet.CondUNetControlNet, diffusers' ControlNetModel)
    (r"hint", "controlnet_cond_embedding"),
    (r"hint_block(\d+)", "blocks.{0}"),
    (r"zero_down(\d+)", "controlnet_down_blocks.{0}"),
    (r"zero_mid", "controlnet_mid_block"),
)


def diffusers_key(path: Tuple[str, ...], levels: int) -> str:
    """The diffusers state-dict key of CondUNet's parameter at `path` (e.g. ('up0_res1', 'skip', 'kernel') ->
    'up_blocks.3.resnets.1.conv_shortcut.weight' for 4 levels); unlisted segments keep their name."""
    parts = []
    for segment in path:
        for pattern, template in _TABLE:
            m = re.fullmatch(pattern, segment)
            if m:
                numbers = m.groups()
                up = levels - 1 - int(numbers[0]) if numbers else 0
                parts.append(template.format(*numbers, up=up))
                break
        else:
            parts.append(segment)
    return ".".join(parts)


def _to_ours(key: str, array: np.ndarray, ours: tuple) -> np.ndarray:
    """A diffusers tensor in our layout: conv [O, I, kh, kw] -> [kh, kw, I, O]; Linear [O, I] or a 1x1 conv
    [O, I, 1, 1] -> Dense kernel [I, O]; norms' weight and biases unchanged."""
    if len(ours) == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if len(ours) == 2:
        return array.reshape(array.shape[:2]).T
    return array


def _theirs_shape(path: Tuple[str, ...], ours: tuple) -> tuple:
    """The shape diffusers stores a parameter of our shape in."""
    if len(ours) == 4:
        kh, kw, i, o = ours
        return (o, i, kh, kw)
    if len(ours) == 2:  # conv_shortcut is a 1x1 conv in diffusers, a Dense here
        return (ours[1], ours[0], 1, 1) if "skip" in path else (ours[1], ours[0])
    return tuple(ours)


def expected_shapes(fields: dict, control: bool = False) -> Dict[Tuple[str, ...], tuple]:
    """Parameter path -> shape of CondUNet(**fields), or with control=True of CondUNetControlNet(**fields), from
    abstract shapes (nothing is allocated)."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from research.cond import Cond
    from research.models.cond_unet import CondUNet
    from research.models.controlnet import CondUNetControlNet

    model = (CondUNetControlNet if control else CondUNet)(**fields)
    side = 2 ** (len(fields["block_out_channels"]) - 1)
    x = jax.ShapeDtypeStruct((1, side, side, int(fields.get("in_channels") or 4)), jnp.float32)
    text = jax.ShapeDtypeStruct((1, 1, int(fields["cross_attention_dim"])), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    hint = None
    if control:
        f, c = int(fields.get("hint_downsample", 8)), int(fields.get("conditioning_channels") or 3)
        hint = jax.ShapeDtypeStruct((1, side * f, side * f, c), jnp.float32)

    def init(x, t, text, hint):
        return model.init(jax.random.PRNGKey(0), x, t, Cond(text=text, hint=hint))

    tree = jax.eval_shape(init, x, t, text, hint)
    return {path: tuple(leaf.shape) for path, leaf in flatten_dict(tree["params"]).items()}


def port_unet(state_dict: Dict[str, np.ndarray], fields: dict, control: bool = False) -> dict:
    """diffusers UNet2DConditionModel state dict (numpy, NCHW / OIHW) -> CondUNet(**fields) parameters; with
    control=True a ControlNetModel state dict -> CondUNetControlNet(**fields) parameters.

    ConversionError when a tensor is missing, has another shape than the architecture needs, or is left over.
    """
    from flax.traverse_util import unflatten_dict

    levels = len(fields["block_out_channels"])
    what = "ControlNet" if control else "U-Net"
    flat, used = {}, set()
    for path, ours in expected_shapes(fields, control).items():
        key = diffusers_key(path, levels)
        want = _theirs_shape(path, ours)
        if key not in state_dict:
            raise ConversionError(f"the {what} weights lack tensor {key} (expected shape {list(want)})")
        array = np.asarray(state_dict[key])
        if tuple(array.shape) != want:
            raise ConversionError(
                f"tensor {key} has shape {list(array.shape)}, expected {list(want)} for the architecture in config.json"
            )
        flat[path] = np.ascontiguousarray(_to_ours(key, array, ours), np.float32)
        used.add(key)
    extra = sorted(set(state_dict) - used)
    if extra:
        shown = ", ".join(f"{k} {list(np.shape(state_dict[k]))}" for k in extra[:3])
        raise ConversionError(
            f"the {what} weights hold {len(extra)} tensor(s) the model has no place for: {shown}"
            f"{' ...' if len(extra) > 3 else ''} (a {what} variant this converter does not implement?)"
        )
    return unflatten_dict(flat)


def read_model_folder(folder: str, class_name: str) -> tuple:
    """(config dict, numpy tensors) of a diffusers model folder: config.json (whose _class_name, when present,
    must be class_name) and diffusion_pytorch_model.safetensors; ConversionError for a missing or unreadable file."""
    from research.pretrained.convert_vae import read_safetensors

    folder = str(folder)
    cfg_path, weights = os.path.join(folder, "config.json"), os.path.join(folder, WEIGHTS)
    if not os.path.isdir(folder):
        raise ConversionError(
            f"{folder} is not a folder; give the {class_name} folder diffusers' save_pretrained wrote"
        )
    for path in (cfg_path, weights):
        if not os.path.isfile(path):
            raise ConversionError(
                f"{path} is missing: give a diffusers {class_name} folder saved with safetensors "
                f"(save_pretrained(..., safe_serialization=True); variants such as .fp16 are not read)"
            )
    with open(cfg_path) as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise ConversionError(f"{cfg_path} is not valid JSON ({e})") from None
    if config.get("_class_name", class_name) != class_name:
        raise ConversionError(f"{cfg_path} has _class_name {config['_class_name']!r}, expected {class_name}")
    try:
        tensors = read_safetensors(weights)
    except (ValueError, KeyError, OSError) as e:
        raise ConversionError(f"{weights} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return config, tensors


def load_diffusers_unet(folder: str) -> tuple:
    """(fields, params) of a diffusers UNet2DConditionModel folder: config.json and
    diffusion_pytorch_model.safetensors; ConversionError for a missing or unreadable file or an unsupported model."""
    config, tensors = read_model_folder(folder, "UNet2DConditionModel")
    fields = unet_fields_from_config(config)
    return fields, port_unet(tensors, fields)
