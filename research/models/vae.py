"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "AutoencoderKL"), NHWC, and the
PatchGAN discriminator (Isola et al. 2017) used for its optional adversarial loss.

Encoder: conv_in, then one level per entry of ch_mult with num_res_blocks ResBlocks of ch * mult channels
(attention where the resolution is in attn_resolutions) and a stride-2 conv between levels, a middle
ResBlock-Attention-ResBlock, GroupNorm-SiLU and a 3x3 conv to 2 * z_channels moments, then LDM's 1x1
"quant" conv. The decoder mirrors it (num_res_blocks + 1 blocks per level, nearest-neighbour upsampling)
behind a 1x1 "post-quant" conv. The downsampling factor is f = 2 ** (len(ch_mult) - 1).

Layer for layer this is the network of LDM's `AutoencoderKL` (and diffusers' port of it): the same ResBlock,
attention and resampling blocks as the U-Net, without a timestep embedding.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.layers import AttentionBlock, Downsample, GroupNorm, ResBlock, Upsample, default_init

# LDM clips the log-variance so exp() neither underflows to a zero std nor overflows early in training.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@flax.struct.dataclass
class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))), mean and logvar [B, h, w, z]."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """[B, h, w, 2z] (mean | logvar along channels) -> posterior, logvar clipped to [-30, 20]."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """Reparameterised draw mean + std * eps, differentiable in mean and logvar; [B, h, w, z]."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example, summed over all latent dimensions: [B]."""
        terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms.astype(jnp.float32), axis=tuple(range(1, terms.ndim)))


def check_autoencoder_resolution(hw: Sequence[int], num_levels: int) -> None:
    """Raise a clear error when the image cannot be downsampled by f = 2 ** (num_levels - 1) and back."""
    factor = 2 ** (num_levels - 1)
    bad = [s for s in hw if s % factor]
    if bad:
        sizes = "x".join(str(s) for s in hw)
        raise ValueError(
            f"image size {sizes} is not divisible by the autoencoder's downsampling factor f={factor} "
            f"(len(model.ch_mult) = {num_levels}); use fewer levels in model.ch_mult (f = 2 ** (levels - 1)) "
            f"or a data set whose side is a multiple of {factor}"
        )


class _Trunk(nn.Module):
    """The architecture fields the encoder and the decoder share (LDM builds both from one config)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    num_heads: int
    dropout: float
    resamp_with_conv: bool
    norm_groups: int
    norm_eps: float
    dtype: Any

    def block_kwargs(self):
        """Keyword arguments of every ResBlock and AttentionBlock in the trunk."""
        res = dict(dropout=self.dropout, norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype)
        attn = dict(num_heads=self.num_heads, norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype)
        return res, attn

    def mid_block(self, h, res: dict, attn: dict, train: bool):
        """ResBlock -> self-attention -> ResBlock at the lowest resolution (called from the compact __call__)."""
        h = ResBlock(h.shape[-1], name="mid_res0", **res)(h, train=train)
        h = AttentionBlock(name="mid_attn", **attn)(h)
        return ResBlock(h.shape[-1], name="mid_res1", **res)(h, train=train)


class Encoder(_Trunk):
    """x [B, H, W, C] -> moments [B, H/f, W/f, 2 * z_channels] (before the quant conv)."""

    z_channels: int = 4

    @nn.compact
    def __call__(self, x, *, train: bool):
        res, attn = self.block_kwargs()
        h = nn.Conv(self.ch, (3, 3), padding="SAME", kernel_init=default_init, dtype=self.dtype, name="conv_in")(
            x.astype(self.dtype)
        )
        for level, mult in enumerate(self.ch_mult):
            for block in range(self.num_res_blocks):
                h = ResBlock(self.ch * mult, name=f"down{level}_res{block}", **res)(h, train=train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttentionBlock(name=f"down{level}_attn{block}", **attn)(h)
            if level != len(self.ch_mult) - 1:
                h = Downsample(h.shape[-1], self.resamp_with_conv, dtype=self.dtype, name=f"down{level}_down")(h)
        h = self.mid_block(h, res, attn, train)
        h = nn.silu(GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm_out")(h))
        return nn.Conv(
            2 * self.z_channels, (3, 3), padding="SAME", kernel_init=default_init, dtype=self.dtype, name="conv_out"
        )(h)


class Decoder(_Trunk):
    """z [B, h, w, z_channels] (after the post-quant conv) -> x [B, h*f, w*f, out_channels]."""

    out_channels: int = 3

    @nn.compact
    def __call__(self, z, *, train: bool):
        res, attn = self.block_kwargs()
        h = nn.Conv(
            self.ch * self.ch_mult[-1],
            (3, 3),
            padding="SAME",
            kernel_init=default_init,
            dtype=self.dtype,
            name="conv_in",
        )(z.astype(self.dtype))
        h = self.mid_block(h, res, attn, train)
        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for block in range(self.num_res_blocks + 1):
                h = ResBlock(self.ch * mult, name=f"up{level}_res{block}", **res)(h, train=train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttentionBlock(name=f"up{level}_attn{block}", **attn)(h)
            if level != 0:
                h = Upsample(h.shape[-1], self.resamp_with_conv, dtype=self.dtype, name=f"up{level}_up")(h)
        h = nn.silu(GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm_out")(h))
        return nn.Conv(
            self.out_channels, (3, 3), padding="SAME", kernel_init=default_init, dtype=self.dtype, name="conv_out"
        )(h)


class AutoencoderKL(nn.Module):
    """encode(x [B, H, W, C]) -> DiagonalGaussian over z [B, H/f, W/f, z_channels]; decode(z) -> [B, H, W, C].

    Calling the module runs both: `(reconstruction, posterior) = model.apply(params, x, key)`, decoding a
    posterior sample drawn with `key`, or the posterior mean when key is None.
    """

    out_channels: int
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    attn_resolutions: Sequence[int] = ()
    num_heads: int = 1
    dropout: float = 0.0
    resamp_with_conv: bool = True
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def setup(self):
        shared = dict(
            ch=self.ch,
            ch_mult=tuple(self.ch_mult),
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=tuple(self.attn_resolutions),
            num_heads=self.num_heads,
            dropout=self.dropout,
            resamp_with_conv=self.resamp_with_conv,
            norm_groups=self.norm_groups,
            norm_eps=self.norm_eps,
            dtype=self.dtype,
        )
        self.encoder = Encoder(z_channels=self.z_channels, **shared)
        self.decoder = Decoder(out_channels=self.out_channels, **shared)
        self.quant_conv = nn.Conv(2 * self.z_channels, (1, 1), kernel_init=default_init, dtype=self.dtype)
        self.post_quant_conv = nn.Conv(self.z_channels, (1, 1), kernel_init=default_init, dtype=self.dtype)

    def encode(self, x: jax.Array, *, train: bool = False) -> DiagonalGaussian:
        check_autoencoder_resolution(x.shape[1:3], len(self.ch_mult))
        moments = self.quant_conv(self.encoder(x, train=train))
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array, *, train: bool = False) -> jax.Array:
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)), train=train).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: Optional[jax.Array] = None, *, train: bool = False):
        posterior = self.encode(x, train=train)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z, train=train), posterior


class PatchDiscriminator(nn.Module):
    """PatchGAN: x [B, H, W, C] -> real/fake logits [B, H / 2**num_layers, W / 2**num_layers, 1], one per patch.

    num_layers 4x4 stride-2 convs (channels ch, 2ch, 4ch, ... capped at 8ch), a 4x4 stride-1 conv and a 4x4
    stride-1 conv to one logit, LeakyReLU(0.2) between them, as in pix2pix and LDM's NLayerDiscriminator.
    GroupNorm replaces their BatchNorm: no running statistics in the train state, and every example's logits
    depend on that example only, so a data-parallel step equals a single-device one.
    """

    ch: int = 64
    num_layers: int = 3
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)  # pix2pix's N(0, 0.02) conv init
        conv = lambda c, stride, name: nn.Conv(
            c, (4, 4), strides=(stride, stride), padding="SAME", kernel_init=init, dtype=self.dtype, name=name
        )
        h = nn.leaky_relu(conv(self.ch, 2, "conv0")(x.astype(self.dtype)), 0.2)
        for i in range(1, self.num_layers + 1):
            stride = 2 if i < self.num_layers else 1
            h = conv(self.ch * min(2**i, 8), stride, f"conv{i}")(h)
            h = nn.leaky_relu(GroupNorm(self.norm_groups, dtype=self.dtype, name=f"norm{i}")(h), 0.2)
        return conv(1, 1, "logits")(h).astype(jnp.float32)
