"""Stable Diffusion's text-conditional U-Net (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"), laid out as diffusers' UNet2DConditionModel so released weights port one to one
(research/pretrained/convert_unet.py), NHWC.

Call contract (every backbone): model.apply({'params': p}, x [B, H, W, C], t [B] (int or float; a scalar is
broadcast), cond: Cond, train=False) -> [B, H, W, out_channels] float32. Reads
  cond.text       [B, L, cross_attention_dim] (required): the text encoder's token embeddings;
  cond.text_mask  [B, L] bool (optional): False marks padding tokens, which cross-attention never attends
                  (Stable Diffusion itself passes no mask and attends all 77 tokens);
  cond.residuals  ControlNet's {'down': tuple, 'mid': array}, added to the skips and the middle block's output
                  (research.models.unet.add_residuals); the skips are diffusers' down_block_res_samples.
Any other Cond field raises ValueError.

Architecture, per level l (block_out_channels[l] channels, H and W halved between levels):
  encoder  layers_per_block x [ResBlock, + SpatialTransformer where cross_attention_levels[l]], then (except at
           the last level) a stride-2 3x3 conv;
  middle   ResBlock, SpatialTransformer, ResBlock (always with attention: UNetMidBlock2DCrossAttn);
  decoder  mirrored, layers_per_block + 1 ResBlocks per level, each fed one skip, then (except at level 0)
           nearest-neighbour x2 upsampling and a 3x3 conv;
  output   GroupNorm, SiLU, 3x3 conv.
The timestep embedding is diffusers' Timesteps layout (see sinusoidal_embedding) through Dense(4 ch0), SiLU, Dense.
A SpatialTransformer is diffusers' Transformer2DModel: GroupNorm(eps 1e-6), proj_in, transformer_layers_per_block
BasicTransformerBlocks (pre-LayerNorm self-attention, cross-attention to the text, GEGLU feed-forward, each with a
residual), proj_out, plus the block's input.

Parameter names (the converter's table in research/pretrained/convert_unet.py maps each to diffusers' key):
conv_in, time_dense0/1, down{l}_res{b}, down{l}_attn{b}, down{l}_down, mid_res0, mid_attn, mid_res1, up{l}_res{b},
up{l}_attn{b}, up{l}_up, norm_out, conv_out; levels l numbered from the highest resolution in both halves.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.cond import as_cond, check_supported
from research.models.layers import (
    CrossAttention,
    GroupNorm,
    ResBlock,
    Upsample,
    checkpointed,
    default_init,
    zero_init,
)
from research.models.unet import add_residuals, check_resolution

IntOrTuple = Union[int, Sequence[int]]


def sinusoidal_embedding(
    t: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0
) -> jax.Array:
    """diffusers' Timesteps embedding, [B] -> [B, dim] float32.

    Frequencies exp(-ln(max_period) * k / (half - freq_shift)), k < half = dim // 2; the layout is [sin | cos],
    or [cos | sin] with flip_sin_to_cos (Stable Diffusion). freq_shift=1 without the flip is DDPM's layout
    (research.models.layers.timestep_embedding). An odd dim gets a zero last column.
    """
    half = dim // 2
    # The exponent is formed as diffusers forms it (product, then quotient) so the float32 rounding matches.
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    parts = [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts[::-1] if flip_sin_to_cos else parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def per_level(value, name: str, levels: int) -> Tuple:
    """An int (or bool) repeated per level, or a sequence of exactly `levels` entries, as a tuple."""
    if isinstance(value, (int, bool)):
        return (value,) * levels
    value = tuple(value)
    if len(value) != levels:
        raise ValueError(
            f"model.{name}={value} has {len(value)} entries but block_out_channels has {levels} levels; "
            f"give one per level or a single int"
        )
    return value


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock on tokens [B, N, C] -> [B, N, C]: LayerNorm -> self-attention (+x),
    LayerNorm -> cross-attention to context [B, L, D] with key mask [B, L] (+x), LayerNorm -> GEGLU MLP (+x)."""

    num_heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, mask=None, *, train: bool = False):
        c = x.shape[-1]
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        attn = lambda name: CrossAttention(self.num_heads, c // self.num_heads, dtype=self.dtype, name=name)
        drop = lambda h: nn.Dropout(self.dropout, deterministic=not train)(h)
        y = ln("norm1")(x)
        x = x + drop(attn("attn1")(y, y))
        y = ln("norm2")(x)
        x = x + drop(attn("attn2")(y, context, mask))
        y = ln("norm3")(x)
        # GEGLU (Shazeer 2020): one projection to [hidden | gate], hidden * GELU(gate) with the exact (erf) GELU.
        hidden, gate = jnp.split(nn.Dense(8 * c, kernel_init=default_init, dtype=self.dtype, name="ff_in")(y), 2, -1)
        y = drop(hidden * nn.gelu(gate, approximate=False))
        return x + nn.Dense(c, kernel_init=zero_init, dtype=self.dtype, name="ff_out")(y)


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel (continuous input), x [B, H, W, C] -> [B, H, W, C].

    proj_in / proj_out are 1x1 convolutions, or Dense layers with use_linear_projection (Stable Diffusion 2);
    the two are the same map, only the stored kernel's layout differs ([1, 1, C, C] vs [C, C]).
    """

    num_heads: int
    num_layers: int = 1
    use_linear_projection: bool = False
    norm_groups: int = 32
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, mask=None, train: bool = False):
        b, h, w, c = x.shape

        def proj(name, init):
            if self.use_linear_projection:
                return nn.Dense(c, kernel_init=init, dtype=self.dtype, name=name)
            return nn.Conv(c, (1, 1), kernel_init=init, dtype=self.dtype, name=name)

        y = proj("proj_in", default_init)(GroupNorm(self.norm_groups, 1e-6, dtype=self.dtype, name="norm")(x))
        y = y.reshape(b, h * w, c)
        for i in range(self.num_layers):
            y = TransformerBlock(self.num_heads, self.dropout, dtype=self.dtype, name=f"block{i}")(
                y, context, mask, train=train
            )
        return x + proj("proj_out", zero_init)(y.reshape(b, h, w, c))


class CondUNet(nn.Module):
    """Stable Diffusion's U-Net (diffusers UNet2DConditionModel with the CrossAttnDownBlock2D / DownBlock2D /
    UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D / UpBlock2D blocks). Call contract: see the module docstring.

    Fields (diffusers' config names where one exists, so the converter maps them one to one):
      out_channels                 channels of the output (SD: 4 latent channels).
      block_out_channels           channels per level (SD: 320, 640, 1280, 1280).
      layers_per_block             ResBlocks per encoder level (the decoder has one more per level).
      cross_attention_levels       bool per level: a SpatialTransformer after each ResBlock of that level
                                   (diffusers' CrossAttn*Block2D vs Down/UpBlock2D; SD: True, True, True, False).
      attention_head_dim           diffusers' misnamed field: it is the NUMBER OF HEADS per level (int or tuple),
                                   each head having channels / heads dimensions (SD 1.x: 8 heads; SD 2.x: (5, 10,
                                   20, 20), i.e. 64-dim heads). diffusers reads it so; we keep the name so a
                                   config.json ports unchanged.
      num_attention_heads          heads per level (int or tuple) when given; None (default) takes
                                   attention_head_dim, as diffusers does.
      cross_attention_dim          D of cond.text (SD 1.x: 768, CLIP ViT-L/14; SD 2.x: 1024, OpenCLIP ViT-H/14).
      use_linear_projection        Dense instead of 1x1 conv proj_in / proj_out (SD 2.x).
      transformer_layers_per_block BasicTransformerBlocks per SpatialTransformer (int or per level; the middle
                                   block uses the last level's).
      norm_num_groups, norm_eps    GroupNorm of the ResBlocks and the output (the transformers' GroupNorm uses
                                   eps 1e-6 and their LayerNorms 1e-5, fixed as in diffusers).
      flip_sin_to_cos, freq_shift  timestep embedding layout (sinusoidal_embedding).
      dropout                      in the ResBlocks, attention outputs and feed-forward (train=True only).
      in_channels                  channels of x; 0 takes whatever x has, a positive value is checked.
      context_length               L of the example text the model is initialised / summarised with (77 = CLIP).
      dtype                        computation dtype (parameters and GroupNorm statistics stay float32).
      remat                        none | full | dots: what each ResBlock / SpatialTransformer keeps for the
                                   backward pass (layers.REMAT_POLICIES).
    """

    out_channels: int
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    cross_attention_levels: Sequence[bool] = (True, True, True, False)
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    transformer_layers_per_block: IntOrTuple = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dropout: float = 0.0
    in_channels: int = 0
    context_length: int = 77
    dtype: Any = jnp.float32
    remat: str = "none"  # per-block rematerialisation: none | full | dots (research.models.layers.REMAT_POLICIES)

    def level_settings(self) -> Tuple[Tuple, Tuple, Tuple]:
        """(cross_attention_levels, heads, transformer layers), one entry per level; ValueError if inconsistent."""
        levels = len(self.block_out_channels)
        if levels < 1:
            raise ValueError("model.block_out_channels is empty; give the channels of each level, e.g. (320, 640)")
        cross = tuple(bool(c) for c in per_level(self.cross_attention_levels, "cross_attention_levels", levels))
        heads_field = "attention_head_dim" if self.num_attention_heads is None else "num_attention_heads"
        heads = per_level(getattr(self, heads_field), heads_field, levels)
        layers = per_level(self.transformer_layers_per_block, "transformer_layers_per_block", levels)
        for ch, n in zip(self.block_out_channels, heads):
            if n <= 0 or ch % n:
                raise ValueError(
                    f"model.{heads_field}={getattr(self, heads_field)}: {ch} channels do not split into {n} heads "
                    f"(diffusers' attention_head_dim counts heads); use a divisor of the level's channels"
                )
        if any(n < 1 for n in layers):
            raise ValueError(f"model.transformer_layers_per_block={layers} must be >= 1")
        return cross, tuple(int(n) for n in heads), tuple(int(n) for n in layers)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond=None, *, train: bool = False):
        cond = as_cond(cond)
        check_supported(cond, ("text", "text_mask", "residuals"), "CondUNet")
        blocks = CondBlocks(self, x, t, cond, train)
        h, skips = cond_encoder(blocks, x)
        if cond.residuals is not None:
            skips, h = add_residuals(cond.residuals, skips, h)

        for level in reversed(range(len(self.block_out_channels))):
            ch = self.block_out_channels[level]
            for block in range(self.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = blocks.res(ch, f"up{level}_res{block}")(h)
                if blocks.cross[level]:
                    h = blocks.transformer(level, f"up{level}_attn{block}")(h)
            if level != 0:
                h = Upsample(ch, with_conv=True, dtype=self.dtype, name=f"up{level}_up")(h)
        assert not skips

        h = nn.silu(GroupNorm(self.norm_num_groups, self.norm_eps, dtype=self.dtype, name="norm_out")(h))
        h = nn.Conv(
            self.out_channels, (3, 3), padding="SAME", kernel_init=zero_init, dtype=self.dtype, name="conv_out"
        )(h)
        return h.astype(jnp.float32)


class CondBlocks:
    """What CondUNet's blocks share, prepared inside the compact method of `module` (a CondUNet or its ControlNet):
    the checked text context and mask, the timestep embedding (time_dense0/1), the per-level settings, and
    builders res(ch, name) / transformer(level, name) of the blocks as functions h -> h."""

    def __init__(self, module, x: jax.Array, t: jax.Array, cond, train: bool):
        if cond is None or cond.text is None:
            raise ValueError(
                f"{type(module).__name__} needs cond.text [B, L, {module.cross_attention_dim}] (text encoder token "
                f"embeddings); pass Cond(text=...)"
            )
        b = x.shape[0]
        context = cond.text
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != module.cross_attention_dim:
            raise ValueError(
                f"cond.text has shape {tuple(context.shape)}; it must be [B, L, cross_attention_dim] = "
                f"[{b}, L, {module.cross_attention_dim}]"
            )
        if module.in_channels and x.shape[-1] != module.in_channels:
            raise ValueError(f"x has {x.shape[-1]} channels but model.in_channels={module.in_channels}")
        check_resolution(x.shape[1:3], len(module.block_out_channels))
        self.module, self.train = module, train
        policy = getattr(module, "remat", "none")
        self.res_cls = checkpointed(ResBlock, policy, static_argnums=(3,))  # train is positional argument 3
        self.transformer_cls = checkpointed(SpatialTransformer, policy, static_argnums=(4,))
        self.cross, self.heads, self.tf_layers = module.level_settings()
        self.context = context.astype(module.dtype)
        self.mask = None if cond.text_mask is None else jnp.asarray(cond.text_mask, bool)
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        ch0 = module.block_out_channels[0]
        emb = sinusoidal_embedding(t, ch0, module.flip_sin_to_cos, module.freq_shift).astype(module.dtype)
        emb = nn.Dense(4 * ch0, kernel_init=default_init, dtype=module.dtype, name="time_dense0")(emb)
        self.emb = nn.Dense(4 * ch0, kernel_init=default_init, dtype=module.dtype, name="time_dense1")(nn.silu(emb))

    def res(self, ch: int, name: str):
        m = self.module
        block = self.res_cls(
            ch, m.dropout, norm_groups=m.norm_num_groups, norm_eps=m.norm_eps, dtype=m.dtype, name=name
        )
        return lambda h: block(h, self.emb, self.train)

    def transformer(self, level: int, name: str):
        m = self.module
        block = self.transformer_cls(
            self.heads[level],
            self.tf_layers[level],
            m.use_linear_projection,
            m.norm_num_groups,
            m.dropout,
            dtype=m.dtype,
            name=name,
        )
        return lambda h: block(h, self.context, self.mask, self.train)


def cond_encoder(blocks: CondBlocks, x: jax.Array, hint_features: Optional[jax.Array] = None) -> tuple:
    """CondUNet's conv_in, encoder and middle block -> (middle output, skips in storage order: diffusers'
    down_block_res_samples). hint_features (ControlNet's encoded hint) are added to the conv_in output."""
    m = blocks.module
    h = nn.Conv(
        m.block_out_channels[0], (3, 3), padding="SAME", kernel_init=default_init, dtype=m.dtype, name="conv_in"
    )(x.astype(m.dtype))
    if hint_features is not None:
        h = h + hint_features.astype(h.dtype)
    skips = [h]
    last = len(m.block_out_channels) - 1
    for level, ch in enumerate(m.block_out_channels):
        for block in range(m.layers_per_block):
            h = blocks.res(ch, f"down{level}_res{block}")(h)
            if blocks.cross[level]:
                h = blocks.transformer(level, f"down{level}_attn{block}")(h)
            skips.append(h)
        if level != last:
            # diffusers pads 1 on every side; flax's 'SAME' would pad (0, 1) for stride 2 and shift the grid.
            h = nn.Conv(
                ch,
                (3, 3),
                strides=(2, 2),
                padding=((1, 1), (1, 1)),
                kernel_init=default_init,
                dtype=m.dtype,
                name=f"down{level}_down",
            )(h)
            skips.append(h)
    h = blocks.res(h.shape[-1], "mid_res0")(h)
    h = blocks.transformer(last, "mid_attn")(h)
    h = blocks.res(h.shape[-1], "mid_res1")(h)
    return h, skips


def check_cond_unet_input(model_config: dict, shape: Sequence[int]) -> None:
    """ValueError naming the fix when a CondUNet config cannot take inputs [H, W, C] (resolution, groups)."""
    channels = tuple(int(c) for c in model_config.get("block_out_channels", CondUNet.block_out_channels))
    check_resolution(tuple(shape[:2]), len(channels))
    groups = int(model_config.get("norm_num_groups", CondUNet.norm_num_groups))
    for ch in channels:
        if ch % groups:
            raise ValueError(
                f"model.block_out_channels entry {ch} is not divisible by model.norm_num_groups={groups}; "
                f"use multiples of {groups}"
            )
    in_channels = int(model_config.get("in_channels", 0) or 0)
    if in_channels and len(shape) > 2 and int(shape[2]) != in_channels:
        raise ValueError(f"the network sees {shape[2]} channels but model.in_channels={in_channels}")


def stable_diffusion_unet(version: str) -> dict:
    """CondUNet fields (without out_channels) of the released Stable Diffusion U-Nets: version '1' (v1.x:
    8 heads per level, 1x1-conv projections, CLIP ViT-L/14 text, 768 wide) or '2' (v2.x: 64-dim heads, i.e.
    diffusers' attention_head_dim=(5, 10, 20, 20), Dense projections, OpenCLIP ViT-H/14 text, 1024 wide)."""
    fields = dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_levels=(True, True, True, False),
        attention_head_dim=8,
        num_attention_heads=None,
        cross_attention_dim=768,
        use_linear_projection=False,
        transformer_layers_per_block=1,
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0.0,
        dropout=0.0,
        in_channels=4,
        context_length=77,
        dtype="float32",
    )
    if version == "2":
        fields.update(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
    elif version != "1":
        raise ValueError(f"Stable Diffusion U-Net version {version!r}; choose '1' (v1.x) or '2' (v2.x)")
    return fields
