"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"), NHWC.

A ControlNet is a trainable copy of a base U-Net's encoder and middle block (initialised from the base's weights,
same parameter names) that also sees a spatial hint: the hint passes through a small convolutional encoder ending
in a zero-initialised conv and is added to the copy's conv_in output. Every skip output and the middle output of
the copy goes through a zero-initialised 1x1 conv; the results are the residuals the base U-Net adds to its own
skips and middle output (Cond.residuals). At initialisation every residual is exactly zero, so the controlled
model equals the base model for any hint.

    residuals = control.apply({'params': pc}, x_t, t, Cond(label=y, hint=h))      # {'down': (...), 'mid': ...}
    out = base.apply({'params': pb}, x_t, t, Cond(label=y, residuals=scale_residuals(residuals, 1.0)))

Two variants, one per base network, with the base's fields plus the hint encoder's:
  UNetControlNet      (model.name='unet_controlnet')      for the DDPM / ADM U-Net (research.models.unet), reads
                      cond.label (class-conditional bases) and cond.hint;
  CondUNetControlNet  (model.name='cond_unet_controlnet') for Stable Diffusion's U-Net (research.models.cond_unet),
                      reads cond.text / text_mask and cond.hint; diffusers' ControlNetModel, whose weights port
                      with research.pretrained.convert_controlnet.

ControlledModel wraps a frozen base and one or more ControlNets into one network with the call contract of every
backbone, so the samplers and guidance run it unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.cond import Cond, as_cond, check_supported
from research.models.cond_unet import CondBlocks, CondUNet, cond_encoder
from research.models.layers import default_init, zero_init
from research.models.unet import UNet, conditioned_embedding, encoder

# The reference implementation's guess-mode ratio: skip i of 13 is scaled by 0.825 ** (12 - i). diffusers uses
# torch.logspace(-1, 0, 13), i.e. the ratio 10 ** (-1 / 12) = 0.82540; pass that to guess_mode_scales to match it.
GUESS_MODE_RATIO = 0.825


class HintEncoder(nn.Module):
    """The hint's encoder (diffusers' ControlNetConditioningEmbedding), hint [B, H, W, c] -> [B, H/f, W/f, out].

    conv_in (3x3, channels[0]) and SiLU; then for each step i -> i + 1 a 3x3 conv keeping channels[i] and a 3x3
    conv to channels[i + 1], each followed by SiLU, the second with stride 2 for the first log2(downsample) steps
    (Stable Diffusion: channels 16, 32, 96, 256, all three steps strided, 512 pixels -> 64 latents); then the
    zero-initialised 3x3 conv_out to the U-Net's first width. Parameters: conv_in, hint_block{j}, conv_out.
    """

    out_channels: int
    channels: Sequence[int] = (16, 32, 96, 256)
    downsample: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hint: jax.Array) -> jax.Array:
        strided = hint_strides(self.channels, self.downsample)
        conv = lambda ch, name, stride=1, init=default_init: nn.Conv(  # noqa: E731
            ch,
            (3, 3),
            strides=(stride, stride),
            padding=((1, 1), (1, 1)),
            kernel_init=init,
            dtype=self.dtype,
            name=name,
        )
        h = nn.silu(conv(self.channels[0], "conv_in")(hint.astype(self.dtype)))
        for i in range(len(self.channels) - 1):
            h = nn.silu(conv(self.channels[i], f"hint_block{2 * i}")(h))
            h = nn.silu(conv(self.channels[i + 1], f"hint_block{2 * i + 1}", 2 if i < strided else 1)(h))
        return conv(self.out_channels, "conv_out", init=zero_init)(h)


def hint_strides(channels: Sequence[int], downsample: int) -> int:
    """How many of the hint encoder's steps are strided: log2(downsample); ValueError when that is not a whole
    number or exceeds the len(channels) - 1 steps."""
    steps = len(tuple(channels)) - 1
    if len(tuple(channels)) < 1:
        raise ValueError("model.hint_channels is empty; give the hint encoder's widths, e.g. (16, 32, 96, 256)")
    k = int(round(math.log2(downsample))) if downsample >= 1 else -1
    if k < 0 or 2**k != downsample or k > steps:
        raise ValueError(
            f"model.hint_downsample={downsample} must be a power of two reached by the hint encoder's {steps} "
            f"step(s) (hint_channels={tuple(channels)}): 1 for a hint at the network's resolution, 8 for Stable "
            f"Diffusion's pixels -> latents"
        )
    return k


def check_hint(module, x: jax.Array, hint: Optional[jax.Array]) -> jax.Array:
    """The hint, checked: [B, H * f, W * f, c] for x [B, H, W, C] and f = module.hint_downsample."""
    name = type(module).__name__
    if hint is None:
        raise ValueError(f"{name} needs cond.hint [B, H, W, C] (the control image); pass Cond(hint=..., ...)")
    f = int(module.hint_downsample)
    want = (x.shape[0], x.shape[1] * f, x.shape[2] * f)
    if hint.ndim != 4 or tuple(hint.shape[:3]) != want:
        raise ValueError(
            f"cond.hint has shape {tuple(hint.shape)}; for inputs {tuple(x.shape)} and model.hint_downsample={f} it "
            f"must be [{want[0]}, {want[1]}, {want[2]}, C]"
        )
    if module.conditioning_channels and hint.shape[-1] != module.conditioning_channels:
        raise ValueError(
            f"cond.hint has {hint.shape[-1]} channels but model.conditioning_channels={module.conditioning_channels}"
        )
    return hint


def zero_convs(module, skips, mid) -> dict:
    """The zero-initialised 1x1 convs (zero_down{i}, zero_mid) on the copy's skips and middle output."""
    conv = lambda h, name: nn.Conv(  # noqa: E731
        h.shape[-1], (1, 1), kernel_init=zero_init, dtype=module.dtype, name=name
    )(h).astype(jnp.float32)
    return {"down": tuple(conv(s, f"zero_down{i}") for i, s in enumerate(skips)), "mid": conv(mid, "zero_mid")}


class UNetControlNet(UNet):
    """ControlNet of a research.models.unet.UNet: every UNet field (they must equal the base's; out_channels is
    unused) plus
      hint_channels          the hint encoder's widths (HintEncoder.channels);
      hint_downsample        hint resolution / network input resolution (1 for a pixel-space base);
      conditioning_channels  channels of the hint (0: any).
    __call__(x, t, cond: Cond(hint, label if num_classes)) -> {'down': tuple of the base's skips' shapes, 'mid': ...}.
    """

    hint_channels: Sequence[int] = (16, 32, 96, 256)
    hint_downsample: int = 1
    conditioning_channels: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond=None, *, train: bool = False):
        cond = as_cond(cond)
        check_supported(cond, ("label", "hint"), type(self).__name__)
        hint = check_hint(self, x, None if cond is None else cond.hint)
        emb = conditioned_embedding(self, t, cond)
        features = HintEncoder(self.ch, self.hint_channels, self.hint_downsample, self.dtype, name="hint")(hint)
        h, skips = encoder(self, x, emb, train, hint_features=features)
        return zero_convs(self, skips, h)


class CondUNetControlNet(CondUNet):
    """ControlNet of Stable Diffusion's U-Net (diffusers' ControlNetModel): every CondUNet field (equal to the
    base's; out_channels is unused) plus hint_channels, hint_downsample (Stable Diffusion: 8) and
    conditioning_channels (SD: 3) as in UNetControlNet.
    __call__(x, t, cond: Cond(text, text_mask optional, hint)) -> {'down': tuple, 'mid': array}.
    """

    hint_channels: Sequence[int] = (16, 32, 96, 256)
    hint_downsample: int = 8
    conditioning_channels: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond=None, *, train: bool = False):
        cond = as_cond(cond)
        check_supported(cond, ("text", "text_mask", "hint"), type(self).__name__)
        hint = check_hint(self, x, None if cond is None else cond.hint)
        blocks = CondBlocks(self, x, t, cond, train)
        ch0 = self.block_out_channels[0]
        features = HintEncoder(ch0, self.hint_channels, self.hint_downsample, self.dtype, name="hint")(hint)
        h, skips = cond_encoder(blocks, x, hint_features=features)
        return zero_convs(self, skips, h)


def guess_mode_scales(num: int, ratio: float = GUESS_MODE_RATIO) -> jax.Array:
    """Guess mode's per-residual scales [num]: ratio ** (num - 1 - i), the shallowest skip weakest and the middle
    block (the last entry) at 1."""
    return jnp.asarray(ratio, jnp.float32) ** jnp.arange(num - 1, -1, -1, dtype=jnp.float32)


def scale_residuals(residuals: dict, scale=1.0, guess_mode: bool = False, ratio: float = GUESS_MODE_RATIO) -> dict:
    """A ControlNet's residuals times its conditioning scale; in guess mode also times guess_mode_scales over
    (skips..., middle), as the reference implementation applies them."""
    down, mid = tuple(residuals["down"]), residuals["mid"]
    scales = jnp.full((len(down) + 1,), 1.0, jnp.float32)
    if guess_mode:
        scales = guess_mode_scales(len(down) + 1, ratio)
    scales = scales * jnp.asarray(scale, jnp.float32)
    return {"down": tuple(r * scales[i] for i, r in enumerate(down)), "mid": mid * scales[-1]}


def sum_residuals(many) -> dict:
    """Several ControlNets' (scaled) residuals summed, as several controls act on one U-Net."""
    many = list(many)
    down = tuple(sum(r["down"][i] for r in many) for i in range(len(many[0]["down"])))
    return {"down": down, "mid": sum(r["mid"] for r in many)}


class ControlledModel:
    """A base U-Net and its ControlNets as one network for the samplers: the call contract of every backbone,

        ControlledModel(base, (control, ...)).apply({'params': {'base': pb, 'controls': (pc, ...)}}, x, t, cond)

    where cond carries the base's condition (label or text) and the hints: cond.hint one array for one ControlNet,
    or a tuple with one hint per ControlNet. Each ControlNet sees the same x, t and condition; its residuals are
    scaled by its entry of `scales` (guess mode optional) and summed before the base adds them. Classifier-free
    guidance keeps the hint in both branches (research.cond.null_cond_like leaves hint untouched).
    """

    def __init__(self, base, controls, scales=1.0, guess_mode: bool = False, ratio: float = GUESS_MODE_RATIO):
        self.base, self.controls = base, tuple(controls)
        if not self.controls:
            raise ValueError("ControlledModel needs at least one ControlNet")
        scales = (scales,) * len(self.controls) if isinstance(scales, (int, float)) else tuple(scales)
        if len(scales) != len(self.controls):
            raise ValueError(f"{len(scales)} conditioning scales for {len(self.controls)} ControlNets; give one each")
        self.scales, self.guess_mode, self.ratio = tuple(float(s) for s in scales), bool(guess_mode), float(ratio)

    def residuals(self, control_params, x, t, cond: Cond, train: bool = False, rngs=None) -> dict:
        """The summed, scaled residuals of every ControlNet for cond (its hint, or hints, set)."""
        hints = cond.hint if isinstance(cond.hint, (tuple, list)) else (cond.hint,)
        if len(hints) != len(self.controls) or len(control_params) != len(self.controls):
            raise ValueError(
                f"{len(self.controls)} ControlNets but {len(hints)} hint(s) and {len(control_params)} parameter "
                f"set(s); give one of each per ControlNet"
            )
        out = []
        for control, params, hint, scale in zip(self.controls, control_params, hints, self.scales):
            fields = {k: getattr(cond, k) for k in ("label", "text", "text_mask") if getattr(cond, k) is not None}
            res = control.apply({"params": params}, x, t, Cond(hint=hint, **fields), train=train, rngs=rngs)
            out.append(scale_residuals(res, scale, self.guess_mode, self.ratio))
        return sum_residuals(out)

    def apply(self, variables, x, t, cond=None, *, train: bool = False, rngs=None):
        cond = as_cond(cond)
        params = variables["params"]
        if cond is None or cond.hint is None:
            raise ValueError("a ControlledModel needs cond.hint (one per ControlNet)")
        residuals = self.residuals(params["controls"], x, t, cond, train=train, rngs=rngs)
        return self.base.apply(
            {"params": params["base"]}, x, t, cond.replace(hint=None, residuals=residuals), train=train, rngs=rngs
        )
