"""Read a local Stable Diffusion folder (what diffusers' `StableDiffusionPipeline.save_pretrained` writes) into the
research models, without torch.

    parts = read_diffusers_pipeline("stable-diffusion-v1-5")
    CondUNet(**parts.unet_fields)                 .apply({'params': parts.unet_params}, x, t, Cond(text=...))
    CLIPTextTransformer(**parts.text_fields)      .apply({'params': parts.text_params}, tokens)   # hidden, pooled
    AutoencoderKL(**parts.vae_fields)             .apply({'params': parts.vae_params}, z / parts.scaling_factor,
                                                         method='decode')
    load_tokenizer(parts.tokenizer_folder); parts.scheduler_config (the scheduler_config.json dict)

research.generate turns the parts into a text-to-image sampler that reproduces diffusers' pipeline.

Folder layout read (nothing else is opened, nothing is downloaded):
  model_index.json                         _class_name StableDiffusionPipeline; the component classes below
  unet/config.json + diffusion_pytorch_model.safetensors          UNet2DConditionModel
  text_encoder/config.json + model.safetensors (or shards)         transformers CLIPTextModel
  vae/config.json + diffusion_pytorch_model.safetensors           AutoencoderKL
  tokenizer/vocab.json + merges.txt, or tokenizer.json (+ special_tokens_map.json / tokenizer_config.json: the
            pad token; SD 1.x pads with <|endoftext|> 49407, SD 2.x with "!" 0)
  scheduler/scheduler_config.json                                   betas, spacing, prediction type
safety_checker/ and feature_extractor/ are ignored. Variant files (diffusion_pytorch_model.fp16.safetensors) are not
read: re-save the pipeline without variant=, or copy the variant file to the plain name.

Which text-encoder layer SD conditions on. diffusers' StableDiffusionPipeline.encode_prompt (0.42) takes
`text_encoder(ids)[0]`, transformers' last_hidden_state = final_layer_norm(output of the LAST encoder layer), and
only with a user-given clip_skip a hidden state k layers earlier (also through final_layer_norm). SD 1.x uses
CLIP ViT-L/14 (12 layers, width 768) so this is its last layer. SD 2.x was trained on the penultimate layer of
OpenCLIP ViT-H/14 (24 layers); the released diffusers folders ship that encoder already cut to 23 layers
(text_encoder/config.json num_hidden_layers 23, width 1024, hidden_act gelu), so the last layer of the folder's
encoder IS the penultimate layer, and the same `output_layer=-1` serves both. `text_output_layer` is therefore -1;
`family` records which release the text encoder's shape matches ('sd1', 'sd2' or 'custom'), for reports only.

Errors are ConversionError with one line naming the component, the path and what was found.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, NamedTuple

from research.pretrained.convert_clip import ConversionError

PIPELINE_CLASSES = ("StableDiffusionPipeline",)
COMPONENTS = {
    # component -> classes model_index.json may name for it
    "unet": ("UNet2DConditionModel",),
    "text_encoder": ("CLIPTextModel",),
    "vae": ("AutoencoderKL",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": None,  # any diffusers scheduler: only its config (betas, spacing, prediction type) is used
}
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
_TOKENIZER_EXTRAS = ("special_tokens_map.json", "tokenizer_config.json")


class SDPipelineParts(NamedTuple):
    """Everything read from a Stable Diffusion folder, as research models' constructor fields and parameter trees
    (float32 numpy, NHWC layouts).

    unet_fields / unet_params       CondUNet(**unet_fields) (includes in_channels and out_channels)
    text_fields / text_params       CLIPTextTransformer(**text_fields)
    text_output_layer               the output_layer SD conditions on (-1: see the module docstring)
    vae_fields / vae_params         AutoencoderKL(**vae_fields) (out_channels = image channels, no 'name')
    scaling_factor                  latents are z * scaling_factor; decode(latents / scaling_factor)
    tokenizer_folder                for research.data.text.load_tokenizer (brings its own pad token)
    scheduler_config                scheduler/scheduler_config.json as a dict
    unet_sample_size                unet config sample_size (latent side; diffusers' default image side / 8)
    model_index                     model_index.json as a dict
    family                          'sd1' / 'sd2' / 'custom' (from the text encoder's shape; informational)
    sha256                          component -> sha256 hex of the bytes read: unet, vae (the safetensors file),
                                    text_encoder (its weight files, shards in sorted order), tokenizer (vocab.json,
                                    merges.txt, tokenizer.json, special_tokens_map.json, tokenizer_config.json:
                                    those present, in that order), scheduler (scheduler_config.json)
    folder                          the absolute path read
    """

    unet_fields: dict
    unet_params: dict
    text_fields: dict
    text_params: dict
    text_output_layer: int
    vae_fields: dict
    vae_params: dict
    scaling_factor: float
    tokenizer_folder: str
    scheduler_config: dict
    unet_sample_size: int
    model_index: dict
    family: str
    sha256: Dict[str, str]
    folder: str


def _sha256(*paths: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _json(path: str, component: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except ValueError as e:
        raise ConversionError(f"{component}: {path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{component}: {path} holds {type(value).__name__}, expected a JSON object")
    return value


def _require(path: str, component: str, what: str) -> str:
    if not os.path.exists(path):
        raise ConversionError(
            f"{component}: {path} is missing ({what}); give a folder written by diffusers' "
            "StableDiffusionPipeline.save_pretrained(..., safe_serialization=True)"
        )
    return path


def _read_model_index(folder: str) -> dict:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise ConversionError(
            f"{path} is missing: {folder} is not a diffusers pipeline folder (give the folder "
            "StableDiffusionPipeline.save_pretrained wrote, which holds model_index.json, unet/, vae/, text_encoder/, "
            "tokenizer/ and scheduler/)"
        )
    index = _json(path, "model_index.json")
    kind = index.get("_class_name")
    if kind not in PIPELINE_CLASSES:
        raise ConversionError(
            f"model_index.json: _class_name is {kind!r}; only {', '.join(PIPELINE_CLASSES)} folders load "
            "(Stable Diffusion 1.x / 2.x text-to-image)"
        )
    for component, allowed in COMPONENTS.items():
        entry = index.get(component)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
            raise ConversionError(f"model_index.json names no {component} (found {entry!r}); the pipeline needs one")
        if allowed is not None and entry[1] not in allowed:
            raise ConversionError(f"model_index.json: {component} is a {entry[1]}, expected {' or '.join(allowed)}")
    return index


def _unet_config(folder: str):
    from research.pretrained.convert_unet import unet_fields_from_config

    cfg_path = _require(os.path.join(folder, "unet", "config.json"), "unet", "the U-Net's config")
    config = _json(cfg_path, "unet")
    kind = config.get("_class_name")
    if kind != "UNet2DConditionModel":
        raise ConversionError(f"unet: {cfg_path} has _class_name {kind!r}, expected UNet2DConditionModel")
    try:
        fields = unet_fields_from_config(config)
    except ConversionError as e:
        raise ConversionError(f"unet: {e}") from None
    return fields, int(config.get("sample_size") or 64)


def _unet_weights(folder: str, fields: dict):
    from research.pretrained.convert_unet import port_unet
    from research.pretrained.convert_vae import read_safetensors

    weights = _require(os.path.join(folder, "unet", _DIFFUSERS_WEIGHTS), "unet", "the U-Net's weights")
    try:
        tensors = read_safetensors(weights)
    except (ValueError, KeyError, OSError) as e:
        raise ConversionError(f"unet: {weights} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        params = port_unet(tensors, fields)
    except ConversionError as e:
        raise ConversionError(f"unet: {e}") from None
    return params, _sha256(weights)


def _text_family(fields: dict) -> str:
    if fields["width"] == 768 and fields["layers"] == 12 and fields["act"] == "quick_gelu":
        return "sd1"  # CLIP ViT-L/14's text tower
    if fields["width"] == 1024 and fields["layers"] == 23 and fields["act"] == "gelu":
        return "sd2"  # OpenCLIP ViT-H/14's text tower, cut after its penultimate layer
    return "custom"


def _read_text_encoder(folder: str):
    from research.pretrained.convert_clip import load_hf_clip_text, read_hf_folder

    path = os.path.join(folder, "text_encoder")
    cfg_path = _require(os.path.join(path, "config.json"), "text_encoder", "the text encoder's config")
    config = _json(cfg_path, "text_encoder")
    architectures = config.get("architectures") or []
    if config.get("model_type") != "clip_text_model" or (architectures and "CLIPTextModel" not in architectures):
        raise ConversionError(
            f"text_encoder: {cfg_path} describes model_type={config.get('model_type')!r} "
            f"architectures={architectures}, expected a transformers CLIPTextModel (clip_text_model)"
        )
    if config.get("use_attention_mask"):
        raise ConversionError(
            f"text_encoder: {cfg_path} sets use_attention_mask, which Stable Diffusion's CLIP encoders never use "
            "and research.models.clip does not implement"
        )
    try:
        hf = read_hf_folder(path)
        fields, params = load_hf_clip_text(hf)
    except ConversionError as e:
        raise ConversionError(f"text_encoder: {e}") from None
    return fields, params, hf.sha256


def _read_vae(folder: str):
    from research.pretrained.convert_vae import read_diffusers_autoencoder

    path = os.path.join(folder, "vae")
    cfg_path = _require(os.path.join(path, "config.json"), "vae", "the autoencoder's config")
    config = _json(cfg_path, "vae")
    kind = config.get("_class_name")
    if kind != "AutoencoderKL":
        raise ConversionError(f"vae: {cfg_path} has _class_name {kind!r}, expected AutoencoderKL")
    if config.get("shift_factor") not in (None, 0, 0.0):
        raise ConversionError(f"vae: {cfg_path} has shift_factor {config['shift_factor']}; SD 1.x / 2.x VAEs have none")
    weights = _require(os.path.join(path, _DIFFUSERS_WEIGHTS), "vae", "the autoencoder's weights")
    try:
        fields, params, scale, channels = read_diffusers_autoencoder(path)
    except (KeyError, TypeError, IndexError, ValueError, OSError) as e:
        raise ConversionError(f"vae: {path} does not load as an AutoencoderKL ({type(e).__name__}: {e})") from None
    fields = {k: v for k, v in fields.items() if k not in ("name", "dtype")}
    fields["out_channels"] = channels
    return fields, params, float(scale), _sha256(weights)


def _read_tokenizer(folder: str):
    path = os.path.join(folder, "tokenizer")
    have = lambda name: os.path.isfile(os.path.join(path, name))
    if not (all(have(name) for name in _TOKENIZER_FILES) or have("tokenizer.json")):
        raise ConversionError(
            f"tokenizer: {path} holds neither vocab.json + merges.txt (the released SD folders) nor tokenizer.json "
            "(transformers 5's save_pretrained); give the pipeline's CLIP tokenizer folder"
        )
    # Every file that can change the ids, the pad token included.
    files = [os.path.join(path, n) for n in _TOKENIZER_FILES + ("tokenizer.json",) + _TOKENIZER_EXTRAS if have(n)]
    return os.path.abspath(path), _sha256(*files)


def _read_scheduler(folder: str):
    path = _require(os.path.join(folder, "scheduler", "scheduler_config.json"), "scheduler", "the noise schedule")
    return _json(path, "scheduler"), _sha256(path)


def read_diffusers_pipeline(folder: str) -> SDPipelineParts:
    """Every component of a Stable Diffusion diffusers folder (see the module docstring); ConversionError (one line
    naming the component and path) for a missing file, another architecture, or components that do not fit."""
    folder = os.path.abspath(str(folder))
    if not os.path.isdir(folder):
        raise ConversionError(
            f"{folder} is not a folder; give the folder StableDiffusionPipeline.save_pretrained wrote"
        )
    index = _read_model_index(folder)
    for component in COMPONENTS:
        _require(os.path.join(folder, component), component, "the component's folder")
    # Configs first (cheap), so a mismatch is reported before gigabytes of weights are read.
    scheduler_config, scheduler_sha = _read_scheduler(folder)
    tokenizer_folder, tokenizer_sha = _read_tokenizer(folder)
    unet_fields, sample_size = _unet_config(folder)
    text_fields, text_params, text_sha = _read_text_encoder(folder)
    if unet_fields["cross_attention_dim"] != text_fields["width"]:
        raise ConversionError(
            f"unet cross_attention_dim is {unet_fields['cross_attention_dim']} but the text encoder's hidden_size is "
            f"{text_fields['width']}: the U-Net and text encoder are from different models"
        )
    unet_params, unet_sha = _unet_weights(folder, unet_fields)
    vae_fields, vae_params, scaling_factor, vae_sha = _read_vae(folder)
    if (
        vae_fields["z_channels"] != unet_fields["in_channels"]
        or unet_fields["out_channels"] != unet_fields["in_channels"]
    ):
        raise ConversionError(
            f"unet in_channels={unet_fields['in_channels']} / out_channels={unet_fields['out_channels']} do not match "
            f"the vae's latent_channels={vae_fields['z_channels']} (inpainting / depth U-Nets are not text-to-image)"
        )
    return SDPipelineParts(
        unet_fields=unet_fields,
        unet_params=unet_params,
        text_fields=text_fields,
        text_params=text_params,
        text_output_layer=-1,
        vae_fields=vae_fields,
        vae_params=vae_params,
        scaling_factor=scaling_factor,
        tokenizer_folder=tokenizer_folder,
        scheduler_config=scheduler_config,
        unet_sample_size=sample_size,
        model_index=index,
        family=_text_family(text_fields),
        sha256={
            "unet": unet_sha,
            "text_encoder": text_sha,
            "vae": vae_sha,
            "tokenizer": tokenizer_sha,
            "scheduler": scheduler_sha,
        },
        folder=folder,
    )


def describe(parts: SDPipelineParts) -> Dict[str, Any]:
    """A JSON-able summary of what was loaded (for a run's record): sizes, family, scaling factor, checksums."""
    return dict(
        folder=parts.folder,
        family=parts.family,
        unet_block_out_channels=list(parts.unet_fields["block_out_channels"]),
        cross_attention_dim=parts.unet_fields["cross_attention_dim"],
        text_layers=parts.text_fields["layers"],
        text_width=parts.text_fields["width"],
        text_output_layer=parts.text_output_layer,
        scaling_factor=parts.scaling_factor,
        scheduler=parts.scheduler_config.get("_class_name"),
        sha256=dict(parts.sha256),
    )
