"""Building blocks shared by the diffusion backbones (NHWC, Flax linen).

Initialisation follows DDPM (Ho et al. 2020): fan-avg uniform variance scaling everywhere, and a zero
initial scale on the last layer of every residual branch so each block starts as the identity.

All attention (the U-Net's and autoencoder's AttentionBlock, DiT's SelfAttention, CrossAttention) goes through
one function, `attention`, built on jax.nn.dot_product_attention.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros

# Rematerialisation of each residual / attention / transformer block (model.remat): what the backward pass keeps.
#   none  every activation is stored (fastest, most memory);
#   full  only each block's inputs are stored; its activations are recomputed in the backward pass (about one
#         extra forward pass of compute; activation memory falls to the block boundaries);
#   dots  the outputs of matrix multiplications (dot_general: Dense layers, attention) are stored; convolutions and
#         elementwise work (norms, activations) are recomputed: jax.checkpoint_policies.dots_saveable. Close to
#         'none' for DiT, close to 'full' for the convolutional U-Nets.
REMAT_POLICIES = ("none", "full", "dots")


def remat_policy_name(policy) -> str:
    """model.remat as one of REMAT_POLICIES (True / False, as older DiT configs wrote it, are 'full' / 'none')."""
    if policy is True:
        return "full"
    if policy is False or policy is None:
        return "none"
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat={policy!r}; choose one of {list(REMAT_POLICIES)}")
    return policy


def checkpointed(cls, policy, static_argnums=()):
    """The block class `cls` under a rematerialisation policy (REMAT_POLICIES): cls itself for 'none'. Parameter
    names and values do not change. static_argnums index the call's positional arguments, self being 0 (a Python
    bool such as `train` must be static and passed positionally)."""
    name = remat_policy_name(policy)
    if name == "none":
        return cls
    saveable = jax.checkpoint_policies.dots_saveable if name == "dots" else None
    return nn.remat(cls, policy=saveable, static_argnums=static_argnums)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim].

    DDPM's layout: frequencies exp(-log(max_period) * k / (half - 1)), then [sin | cos].
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    """Group normalisation over [..., C] (e.g. [B, H, W, C]) with statistics in float32.

    Written out rather than using nn.GroupNorm, for speed on CPU: every reduction is a sum over the spatial
    axes into one value per (example, channel), and the few per-channel sums are then added up within each
    group. XLA's CPU backend runs those contiguous reductions several times faster than a reduction over the
    grouped reshape [B, H*W, G, C/G], and their gradients are again per-channel sums (experiments/
    benchmark_unet.py). The variance is two-pass (mean first, then the mean square of x - mean), as exact as
    the textbook form.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        groups = min(self.num_groups, channels)
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        xf = x.astype(jnp.float32)
        batch, spatial = x.shape[0], tuple(range(1, x.ndim - 1))
        per_group = channels // groups
        count = math.prod(x.shape[1:-1]) * per_group

        def group_mean(per_channel_sum):  # [B, C] -> the group's mean broadcast back over [B, 1.., C]
            g = per_channel_sum.reshape(batch, groups, per_group).sum(-1) / count
            return jnp.repeat(g, per_group, axis=1).reshape((batch,) + (1,) * len(spatial) + (channels,))

        centered = xf - group_mean(jnp.sum(xf, axis=spatial))
        var = group_mean(jnp.sum(jnp.square(centered), axis=spatial))
        return (centered * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias).astype(self.dtype)


class Downsample(nn.Module):
    """Halves H and W: strided 3x3 conv, or 2x2 average pooling when with_conv is False."""

    channels: int
    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.with_conv:
            # DDPM pads asymmetrically (0 before, 1 after) so the strided conv sees the same pixels as
            # TF's 'SAME'; flax's 'SAME' does exactly that for stride 2.
            return nn.Conv(
                self.channels,
                (3, 3),
                strides=(2, 2),
                padding="SAME",
                kernel_init=default_init,
                dtype=self.dtype,
                name="conv",
            )(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition, then an optional 3x3 conv."""

    channels: int
    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        if self.with_conv:
            x = nn.Conv(self.channels, (3, 3), padding="SAME", kernel_init=default_init, dtype=self.dtype, name="conv")(
                x
            )
        return x


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with the embedding injected in between.

    With use_scale_shift_norm (ADM, Dhariwal & Nichol 2021) the embedding gives a scale and shift applied
    after the second GroupNorm; otherwise (DDPM) it is added to the hidden activations. With emb=None (the
    autoencoder, which has no timestep) the block has no embedding projection at all.

    resample='down' / 'up' makes it ADM's resampling block (BigGAN style, `resblock_updown`): after the first
    GroupNorm-SiLU both the hidden path and the skip path are halved by 2x2 average pooling or doubled by
    nearest-neighbour repetition, so the block changes H and W; it has the parameters of a plain block.
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    resample: str = "none"
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb=None, train: bool = False):
        norm = lambda name: GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name=name)
        h = nn.silu(norm("norm1")(x))
        if self.resample != "none":
            if self.resample not in ("up", "down"):
                raise ValueError(f"ResBlock resample={self.resample!r}; choose 'none', 'up' or 'down'")
            change = Upsample(x.shape[-1], with_conv=False) if self.resample == "up" else Downsample(x.shape[-1], False)
            h, x = change(h), change(x)
        h = nn.Conv(
            self.out_channels, (3, 3), padding="SAME", kernel_init=default_init, dtype=self.dtype, name="conv1"
        )(h)
        if emb is not None:
            emb_out = nn.Dense(
                self.out_channels * (2 if self.use_scale_shift_norm else 1),
                kernel_init=default_init,
                dtype=self.dtype,
                name="emb_proj",
            )(nn.silu(emb))[:, None, None, :]
        if emb is None:
            h = norm("norm2")(h)
        elif self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm("norm2")(h) * (1 + scale) + shift
        else:
            h = norm("norm2")(h + emb_out)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.out_channels, (3, 3), padding="SAME", kernel_init=zero_init, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Dense(self.out_channels, kernel_init=default_init, dtype=self.dtype, name="skip")(x)
        return x + h


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[jax.Array] = None, dtype: Optional[Dtype] = None
) -> jax.Array:
    """Multi-head scaled dot-product attention softmax(q k^T / sqrt(d)) v.

    q [B, Nq, heads, d], k and v [B, Nk, heads, d]; mask (True = attend) broadcastable to [B, heads, Nq, Nk],
    e.g. a key-padding mask [B, Nk] as mask[:, None, None, :]. Returns [B, Nq, heads, d] in `dtype` (default:
    the inputs' promoted dtype), to which q, k and v are cast first.

    jax.nn.dot_product_attention (XLA implementation) computes the logits with a float32 accumulator
    (preferred_element_type) even for bfloat16 / float16 inputs, scales and masks them in float32 and takes the
    softmax in float32; only the probabilities are cast back to the input dtype for the product with v. So no
    upcast is needed here (tests/test_attention.py checks the bfloat16 result against a float32 softmax).
    A query row whose keys are all masked gets uniform weights over them, not NaN.

    On a GPU, bfloat16 / float16 attention without a mask runs cuDNN's fused flash kernel where its shape limits
    allow (attention_implementation); everything else takes the XLA path. The CPU cannot multiply float16 into a
    float32 accumulator, so there float16 inputs are computed in float32 and the result cast back.
    """
    dtype = dtype or jnp.result_type(q, k, v)
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.ndim > 4:
            raise ValueError(f"attention mask has shape {mask.shape}; it must broadcast to [B, heads, Nq, Nk]")
        # dot_product_attention wants a rank-4 bool mask; numpy broadcasting aligns trailing axes.
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    platform = jax.default_backend()
    if attention_implementation(dtype, q.shape[-1], platform, masked=mask is not None) == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            pass  # a shape or cuDNN version the fused kernel does not take
    if platform == "cpu" and dtype == jnp.float16:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla").astype(dtype)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def attention_implementation(dtype, head_dim: int, platform: str, *, masked: bool = False) -> str:
    """'cudnn' (fused flash attention) for unmasked bfloat16 / float16 attention on a GPU with a head size cuDNN
    takes (a multiple of 8, at most 128), else 'xla'."""
    fused_dtype = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if platform in ("gpu", "cuda") and fused_dtype and not masked and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, GroupNorm first (DDPM/ADM style).

    x [B, H, W, C] -> [B, H, W, C]. Parameters: norm, qkv (one Dense to 3C laid out [q | k | v], each head-major
    inside), proj_out (zero-initialised, so the block starts as the identity).
    """

    num_heads: int = 1
    head_channels: int = -1
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        heads = c // self.head_channels if self.head_channels > 0 else self.num_heads
        if c % heads:
            raise ValueError(f"AttentionBlock: {c} channels do not split into {heads} heads")
        d = c // heads
        y = GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm")(x)
        qkv = nn.Dense(3 * c, kernel_init=default_init, dtype=self.dtype, name="qkv")(y)
        qkv = qkv.reshape(b, h * w, 3, heads, d)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dtype=self.dtype).reshape(b, h, w, c)
        out = nn.Dense(c, kernel_init=zero_init, dtype=self.dtype, name="proj_out")(out)
        return x + out


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to a context (Stable Diffusion's cross-attention).

    x [B, N, C] (or [B, H, W, C], flattened to H*W tokens and restored) queries a context [B, L, D] (e.g. text
    token embeddings); mask [B, L] bool, True = a real context token, False = padding that is never attended.
    Parameters: to_q [C, heads * head_dim], to_k and to_v [D, heads * head_dim], all without bias, and to_out
    [heads * head_dim, C] with bias, as diffusers' Attention names them. to_out starts at zero: the module is
    meant as a residual branch (x + CrossAttention(...)), which then starts as the identity, as every other
    residual branch here does. Returns [B, N, C] (or [B, H, W, C]), without the residual.
    """

    num_heads: int = 8
    head_dim: int = 64
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        shape, c = x.shape, x.shape[-1]
        x = x.reshape(shape[0], -1, c)
        b, n, _ = x.shape
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(f"CrossAttention: context has shape {context.shape}; it must be [B, L, D] with B = {b}")
        if mask is not None and mask.shape != context.shape[:2]:
            raise ValueError(f"CrossAttention: mask has shape {mask.shape}; it must be [B, L] = {context.shape[:2]}")
        inner = self.num_heads * self.head_dim
        proj = lambda name: nn.Dense(inner, use_bias=False, kernel_init=default_init, dtype=self.dtype, name=name)
        q = proj("to_q")(x).reshape(b, n, self.num_heads, self.head_dim)
        k = proj("to_k")(context).reshape(b, context.shape[1], self.num_heads, self.head_dim)
        v = proj("to_v")(context).reshape(b, context.shape[1], self.num_heads, self.head_dim)
        out = attention(q, k, v, mask=None if mask is None else mask[:, None, None, :], dtype=self.dtype)
        out = nn.Dense(c, kernel_init=zero_init, dtype=self.dtype, name="to_out")(out.reshape(b, n, inner))
        return out.reshape(shape[:-1] + (c,))
