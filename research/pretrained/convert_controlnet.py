"""Load a diffusers ControlNetModel folder (a released Stable Diffusion ControlNet) into
research.models.controlnet.CondUNetControlNet, without torch.

    fields, params = load_diffusers_controlnet("control_v11p_sd15_canny")
    residuals = CondUNetControlNet(**fields).apply({'params': params}, x, t, Cond(text=..., hint=...))

The folder holds config.json and diffusion_pytorch_model.safetensors (save_pretrained's layout). The copy of the
U-Net's encoder converts with the U-Net's renaming table (research.pretrained.convert_unet), which also names the
hint encoder (controlnet_cond_embedding) and the zero convs (controlnet_down_blocks.{i}, controlnet_mid_block);
every tensor the model expects must be present with its shape and none may be left over (ConversionError).
"""

from __future__ import annotations

from research.pretrained.convert_clip import ConversionError
from research.pretrained.convert_unet import port_unet, read_model_folder, unet_fields_from_config

# ControlNetModel settings outside the U-Net's: read below, or required at the one value implemented.
_CONTROL_KEYS = {"conditioning_channels", "conditioning_embedding_out_channels"}
_CONTROL_FIXED = {"controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}


def controlnet_fields_from_config(config: dict) -> dict:
    """diffusers ControlNetModel config.json -> CondUNetControlNet constructor arguments (out_channels included,
    unused). ConversionError names any setting that is not implemented."""
    for key, value in _CONTROL_FIXED.items():
        if config.get(key, value) != value:
            raise ConversionError(
                f"controlnet config {key}={config[key]!r} is not supported (only {value!r} is implemented)"
            )
    unet_config = {k: v for k, v in config.items() if k not in _CONTROL_KEYS and k not in _CONTROL_FIXED}
    down = list(unet_config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    # A ControlNet has no decoder: give the U-Net reader the mirror of the encoder it checks for.
    unet_config["up_block_types"] = [k.replace("Down", "Up") for k in reversed(down)]
    fields = unet_fields_from_config(unet_config)
    hint_channels = tuple(int(c) for c in config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
    fields.update(
        hint_channels=hint_channels,
        hint_downsample=2 ** (len(hint_channels) - 1),
        conditioning_channels=int(config.get("conditioning_channels", 3)),
    )
    return fields


def load_diffusers_controlnet(folder: str) -> tuple:
    """(fields, params) of a diffusers ControlNetModel folder; ConversionError for a missing or unreadable file, an
    unsupported setting, or a missing, misshapen or extra tensor."""
    config, tensors = read_model_folder(folder, "ControlNetModel")
    fields = controlnet_fields_from_config(config)
    return fields, port_unet(tensors, fields, control=True)
