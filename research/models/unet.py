"""The DDPM / ADM U-Net (Ho et al. 2020; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021), NHWC.

Call contract (every backbone): model.apply({'params': p}, x [B, H, W, C], t [B], cond, train=...) where cond is
a research.cond.Cond, None, or a label array [B] int (shorthand for Cond(label=...)). The U-Net reads
cond.label (class conditioning) and cond.residuals (ControlNet); any other field raises ValueError.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.cond import as_cond, check_supported
from research.models.layers import (
    AttentionBlock,
    Downsample,
    GroupNorm,
    ResBlock,
    Upsample,
    checkpointed,
    default_init,
    timestep_embedding,
    zero_init,
)


class UNet(nn.Module):
    """eps/x0/v-predicting U-Net.

    Input x [B, H, W, C], timesteps t [B] (original training indices, may be fractional), cond (see the module
    docstring). Output [B, H, W, out_channels] float32.

    Levels: one per entry of ch_mult, each with num_res_blocks ResBlocks of ch * mult channels and
    attention where the current resolution is in attn_resolutions; H and W halve between levels. The
    decoder mirrors it with num_res_blocks + 1 blocks per level, each fed a skip connection.

    Class conditioning (num_classes > 0): the label embedding is added to the timestep embedding; cond.label is
    then required. With null_label the table has num_classes + 1 rows and label num_classes is the null label
    of classifier-free guidance (the trainer drops labels to it with research.cond.drop_condition).

    Skips, in storage order (the order of cond.residuals['down']): [0] the conv_in output; then for each level
    from the highest resolution down, the output of each of its num_res_blocks ResBlock(+attention) stages,
    followed (except at the last level) by the Downsample output: len(ch_mult) * (num_res_blocks + 1) skips in
    all, which the decoder consumes in reverse.
    ControlNet residuals (cond.residuals = {'down': tuple, 'mid': array}, both keys optional) are added to
    those skips as the decoder receives them (the encoder's own path is unchanged) and to the middle block's
    output, as in Zhang et al. (2023) and diffusers' UNet2DConditionModel; each must have its skip's shape.
    """

    out_channels: int
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    head_channels: int = -1
    dropout: float = 0.1
    use_scale_shift_norm: bool = False
    resamp_with_conv: bool = True
    resblock_updown: bool = False
    num_classes: int = 0
    null_label: bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    remat: str = "none"  # per-block rematerialisation: none | full | dots (research.models.layers.REMAT_POLICIES)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond=None, *, train: bool = False):
        cond = as_cond(cond)
        check_supported(cond, ("label", "residuals"), "UNet")
        check_resolution(x.shape[1:3], len(self.ch_mult))
        emb = conditioned_embedding(self, t, cond)
        residuals = None if cond is None else cond.residuals
        res, attn = block_arguments(self)
        Res, Attn = block_classes(self)
        h, skips = encoder(self, x, emb, train)
        if residuals is not None:
            skips, h = add_residuals(residuals, skips, h)

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for block in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = Res(self.ch * mult, name=f"up{level}_res{block}", **res)(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = Attn(name=f"up{level}_attn{block}", **attn)(h)
            if level != 0:
                h = resampler(self, "up", h.shape[-1], f"up{level}_up")(h, emb, train)
        assert not skips

        h = nn.silu(GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm_out")(h))
        h = nn.Conv(
            self.out_channels, (3, 3), padding="SAME", kernel_init=zero_init, dtype=self.dtype, name="conv_out"
        )(h)
        return h.astype(jnp.float32)


def time_embedding(module, t: jax.Array) -> jax.Array:
    """The sinusoidal embedding of t through two Dense layers (width 4 ch), as module's time_dense0/1. Call from
    the compact method of a module with fields ch and dtype."""
    emb_dim = 4 * module.ch
    emb = timestep_embedding(t, module.ch)
    emb = nn.Dense(emb_dim, kernel_init=default_init, dtype=module.dtype, name="time_dense0")(emb)
    return nn.Dense(emb_dim, kernel_init=default_init, dtype=module.dtype, name="time_dense1")(nn.silu(emb))


def conditioned_embedding(module, t: jax.Array, cond) -> jax.Array:
    """time_embedding plus, for a class-conditional module (num_classes > 0), the label embedding (label_embed,
    num_classes + 1 rows with null_label); shared by UNet and its ControlNet."""
    emb = time_embedding(module, t)
    if module.num_classes:
        if cond is None or cond.label is None:
            raise ValueError(
                f"this {type(module).__name__} is class-conditional (num_classes > 0) but no labels were given"
            )
        table = module.num_classes + int(module.null_label)
        emb = emb + nn.Embed(table, emb.shape[-1], name="label_embed")(cond.label).astype(emb.dtype)
    return emb


def block_arguments(module) -> tuple:
    """(ResBlock keyword arguments, AttentionBlock keyword arguments) from a U-Net-like module's fields."""
    res = dict(
        dropout=module.dropout,
        use_scale_shift_norm=module.use_scale_shift_norm,
        norm_groups=module.norm_groups,
        norm_eps=module.norm_eps,
        dtype=module.dtype,
    )
    attn = dict(
        num_heads=module.num_heads,
        head_channels=module.head_channels,
        norm_groups=module.norm_groups,
        norm_eps=module.norm_eps,
        dtype=module.dtype,
    )
    return res, attn


def block_classes(module) -> tuple:
    """(ResBlock, AttentionBlock) under the module's rematerialisation policy (model.remat; 'none' for modules
    without the field). The ResBlock takes `train` as its third positional argument."""
    policy = getattr(module, "remat", "none")
    return checkpointed(ResBlock, policy, static_argnums=(3,)), checkpointed(AttentionBlock, policy)


def resampler(module, direction: str, channels: int, name: str):
    """The block between levels, as a function (h, emb, train) -> h: a strided conv / nearest-neighbour upsampling
    (+ conv) (DDPM), or with module.resblock_updown a resampling ResBlock (ADM)."""
    if getattr(module, "resblock_updown", False):
        res, _ = block_arguments(module)
        block = block_classes(module)[0](channels, resample=direction, name=name, **res)
        return lambda h, emb, train: block(h, emb, train)
    cls = Downsample if direction == "down" else Upsample
    block = cls(channels, module.resamp_with_conv, dtype=module.dtype, name=name)
    return lambda h, emb, train: block(h)


def encoder(module, x: jax.Array, emb: jax.Array, train: bool, hint_features=None) -> tuple:
    """The U-Net's encoder and middle block, built inside `module`'s compact method with the U-Net's parameter
    names (conv_in, down{level}_*, mid_*): -> (middle output, skips in storage order). Shared by UNet, its
    ControlNet (which adds its encoded hint, hint_features, to the conv_in output) and the noise-aware classifier
    (research/models/classifier.py), whose encoder is this one."""
    res, attn = block_arguments(module)
    Res, Attn = block_classes(module)
    h = nn.Conv(module.ch, (3, 3), padding="SAME", kernel_init=default_init, dtype=module.dtype, name="conv_in")(
        x.astype(module.dtype)
    )
    if hint_features is not None:
        h = h + hint_features.astype(h.dtype)
    skips = [h]
    for level, mult in enumerate(module.ch_mult):
        for block in range(module.num_res_blocks):
            h = Res(module.ch * mult, name=f"down{level}_res{block}", **res)(h, emb, train)
            if h.shape[1] in module.attn_resolutions:
                h = Attn(name=f"down{level}_attn{block}", **attn)(h)
            skips.append(h)
        if level != len(module.ch_mult) - 1:
            h = resampler(module, "down", h.shape[-1], f"down{level}_down")(h, emb, train)
            skips.append(h)
    h = Res(h.shape[-1], name="mid_res0", **res)(h, emb, train)
    h = Attn(name="mid_attn", **attn)(h)
    h = Res(h.shape[-1], name="mid_res1", **res)(h, emb, train)
    return h, skips


def add_residuals(residuals, skips, mid):
    """(skips + residuals['down'], mid + residuals['mid']), checking keys, count and shapes (ValueError)."""
    if not isinstance(residuals, Mapping) or set(residuals) - {"down", "mid"}:
        keys = sorted(residuals) if isinstance(residuals, Mapping) else type(residuals).__name__
        raise ValueError(f"cond.residuals must be a dict with keys 'down' and/or 'mid'; got {keys}")
    down = residuals.get("down")
    if down is not None:
        if len(down) != len(skips):
            raise ValueError(
                f"cond.residuals['down'] has {len(down)} arrays but this U-Net stores {len(skips)} skips "
                f"(shapes {[tuple(s.shape) for s in skips]}); give one residual per skip"
            )
        for i, (r, s) in enumerate(zip(down, skips)):
            if r.shape != s.shape:
                raise ValueError(
                    f"cond.residuals['down'][{i}] has shape {tuple(r.shape)} but skip {i} has shape "
                    f"{tuple(s.shape)}; residuals must match the skips in storage order"
                )
        skips = [s + r.astype(s.dtype) for s, r in zip(skips, down)]
    r = residuals.get("mid")
    if r is not None:
        if r.shape != mid.shape:
            raise ValueError(
                f"cond.residuals['mid'] has shape {tuple(r.shape)} but the middle block's output has "
                f"shape {tuple(mid.shape)}"
            )
        mid = mid + r.astype(mid.dtype)
    return skips, mid


def check_resolution(hw: Sequence[int], num_levels: int) -> None:
    """Raise a clear error when H or W cannot be halved num_levels - 1 times."""
    factor = 2 ** (num_levels - 1)
    bad = [s for s in hw if s % factor]
    if bad:
        sizes = "x".join(str(s) for s in hw)
        raise ValueError(
            f"image size {sizes} cannot be downsampled {num_levels - 1} times by the U-Net "
            f"(len(model.ch_mult) = {num_levels} needs sides divisible by {factor}); "
            f"use fewer levels in model.ch_mult or pad/resize the data to a multiple of {factor}"
        )
