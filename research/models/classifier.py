"""ADM's noise-aware classifier (Dhariwal & Nichol 2021, `EncoderUNetModel` with pool='attention'), NHWC.

The U-Net's encoder half (timestep embedding, conv_in, the down levels of ResBlocks with attention where
configured, the middle block), then GroupNorm-SiLU and ADM's attention pooling head: the H*W feature tokens with
their mean prepended as token 0, plus a learned positional embedding, go through one multi-head QKV attention;
token 0's output, projected to num_classes, is the logits. pool='mean' replaces the head by the mean token
through a Dense (a cheaper ablation).

Call contract: model.apply({'params': p}, x [B, H, W, C], t [B] int (original training timesteps), cond=None,
train=False) -> logits [B, num_classes] float32. A classifier never reads a label: cond may be None or carry
`label` (the shared init helper passes example labels for any model with num_classes > 0), which is ignored;
any other Cond field raises. Every example is processed independently (GroupNorm and attention are per example),
so the gradient of sum_b log p(y_b | x_b) with respect to x is the per-example gradient classifier guidance needs.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.cond import as_cond, check_supported
from research.models.layers import GroupNorm, attention, default_init
from research.models.unet import check_resolution, encoder, time_embedding

POOLS = ("attention", "mean")


class AttentionPool(nn.Module):
    """ADM's AttentionPool2d: [B, H, W, C] -> [B, out_dim], the attention output of the mean token.

    Parameters: pos_emb [H*W + 1, C] (normal / sqrt(C), as ADM), qkv (Dense C -> 3C, [q | k | v], head-major),
    proj (Dense C -> out_dim). The spatial size is fixed at initialisation by the positional embedding."""

    out_dim: int
    num_heads: int = 1
    head_channels: int = -1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        heads = c // self.head_channels if self.head_channels > 0 else self.num_heads
        if heads < 1 or c % heads:
            raise ValueError(f"AttentionPool: {c} channels do not split into {heads} heads")
        tokens = x.reshape(b, h * w, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        pos = self.param("pos_emb", nn.initializers.normal(c**-0.5), (h * w + 1, c), jnp.float32)
        if pos.shape[0] != h * w + 1:
            raise ValueError(f"AttentionPool was built for {pos.shape[0] - 1} positions, got {h}x{w}")
        tokens = tokens + pos.astype(tokens.dtype)[None]
        qkv = nn.Dense(3 * c, kernel_init=default_init, dtype=self.dtype, name="qkv")(tokens)
        qkv = qkv.reshape(b, h * w + 1, 3, heads, c // heads)
        # Only token 0 is read out, so only its query is needed (ADM computes all and keeps the first).
        out = attention(qkv[:, :1, 0], qkv[:, :, 1], qkv[:, :, 2], dtype=self.dtype).reshape(b, c)
        return nn.Dense(self.out_dim, kernel_init=default_init, dtype=self.dtype, name="proj")(out)


class HalfUNet(nn.Module):
    """Noise-aware classifier: x [B, H, W, C], t [B] -> logits [B, num_classes] float32.

    Fields as the U-Net's (research/models/unet.py) for the encoder, plus num_classes (the logits) and pool
    ('attention': ADM's attention pooling; 'mean': mean-pooled features through a Dense). out_channels is what
    research.models.build_model passes every backbone (the image channels); a classifier's output size is
    num_classes, so out_channels is accepted and ignored.
    """

    out_channels: int = 0
    num_classes: int = 10
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    head_channels: int = -1
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    resamp_with_conv: bool = True
    resblock_updown: bool = False
    pool: str = "attention"
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    remat: str = "none"  # per-block rematerialisation of the shared encoder (research.models.layers.REMAT_POLICIES)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond=None, *, train: bool = False):
        check_supported(as_cond(cond), ("label",), "HalfUNet (a classifier: any label is ignored)")
        if self.num_classes < 1:
            raise ValueError(f"HalfUNet needs num_classes >= 1, got {self.num_classes}")
        if self.pool not in POOLS:
            raise ValueError(f"model.pool={self.pool!r} is not valid; choose one of {list(POOLS)}")
        check_resolution(x.shape[1:3], len(self.ch_mult))
        # The U-Net's time embedding and encoder with its parameter names, so a diffusion run's encoder could
        # initialise one.
        h, _ = encoder(self, x, time_embedding(self, t), train)

        h = nn.silu(GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm_out")(h))
        if self.pool == "attention":
            logits = AttentionPool(
                self.num_classes, self.num_heads, self.head_channels, dtype=self.dtype, name="attn_pool"
            )(h)
        else:
            logits = nn.Dense(self.num_classes, kernel_init=default_init, dtype=self.dtype, name="head")(
                h.mean(axis=(1, 2))
            )
        return logits.astype(jnp.float32)
