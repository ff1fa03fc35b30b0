"""Diffusion Transformer, DiT (Peebles & Xie 2023), NHWC in and out.

The image (or latent) [B, H, W, C] is cut into p x p patches, each linearly embedded into a token; fixed 2-D
sin-cos position embeddings are added; a stack of transformer blocks conditioned by adaLN-Zero on
c = embed(t) + embed(cond.label) processes the tokens; a final adaLN layer and a linear map bring every token
back to a p x p x out_channels patch.

Call contract (every backbone): model.apply({'params': p}, x [B, H, W, C], t [B], cond, train=...) where cond is
a research.cond.Cond, None, or a label array [B] int (shorthand for Cond(label=...)). DiT reads cond.label only.

adaLN-Zero: each block regresses (shift, scale, gate) for its attention and MLP branches from c, through a
Dense initialised to zero, so every block starts as the identity and the whole network predicts exactly zero.
Initialisation otherwise follows the paper's code: Xavier-uniform linear layers (the patch embedding too),
normal(0.02) for the timestep MLP and the class table.

Named architectures: `DiT-{S,B,L,XL}/{2,4,8}` (Table 1 of the paper for depth / width / heads; the suffix
is the patch size). `dit_model_config(name, **overrides)` gives a config.model section for one of them.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.cond import as_cond, check_supported
from research.models.layers import attention, checkpointed, zero_init

# Xavier uniform, as torch.nn.init.xavier_uniform_ on every nn.Linear in the paper's code. On a Dense kernel
# [in, out] flax's fans equal torch's on the transposed weight [out, in].
xavier_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
small_normal_init = nn.initializers.normal(0.02)

# Table 1 of Peebles & Xie (2023): size -> (depth, hidden size, heads).
DIT_SIZES: Dict[str, Tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DIT_PATCH_SIZES = (2, 4, 8)


def dit_variants() -> list:
    """The 12 architectures of the paper, e.g. 'DiT-XL/2'."""
    return [f"DiT-{size}/{p}" for size in DIT_SIZES for p in DIT_PATCH_SIZES]


def dit_architecture(
    variant: str = "", depth: int = 0, hidden_size: int = 0, num_heads: int = 0, patch_size: int = 0
) -> Tuple[int, int, int, int]:
    """(depth, hidden_size, num_heads, patch_size) of a named variant, with any non-zero field overriding it.

    Without a variant all four numbers must be given. Raises ValueError naming the problem and the fix.
    """
    explicit = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)
    if variant:
        if variant not in dit_variants():
            raise ValueError(
                f"model.variant={variant!r} is not a DiT architecture; choose one of {dit_variants()} "
                f"or set model.variant='' and give depth, hidden_size, num_heads and patch_size"
            )
        size, patch = variant[len("DiT-") :].split("/")
        named = dict(zip(("depth", "hidden_size", "num_heads"), DIT_SIZES[size]), patch_size=int(patch))
        explicit = {k: v if v else named[k] for k, v in explicit.items()}
    missing = [k for k, v in explicit.items() if v <= 0]
    if missing:
        raise ValueError(
            f"DiT needs model.{missing[0]} > 0 (or a model.variant such as 'DiT-XL/2'; choose one of {dit_variants()})"
        )
    if explicit["hidden_size"] % explicit["num_heads"]:
        raise ValueError(
            f"model.hidden_size={explicit['hidden_size']} does not split into model.num_heads="
            f"{explicit['num_heads']} heads; pick a divisor"
        )
    return explicit["depth"], explicit["hidden_size"], explicit["num_heads"], explicit["patch_size"]


def dit_model_config(variant: str = "DiT-XL/2", **overrides) -> ml_collections.ConfigDict:
    """A config.model section for a DiT; `overrides` set any field (e.g. depth=2 for a quick test).

    depth / hidden_size / num_heads / patch_size left at 0 come from the variant, so a command-line
    `--config.model.variant=DiT-B/4` switches architecture without touching them.
    """
    c = ml_collections.ConfigDict(
        dict(
            name="dit",
            variant=variant,  # one of dit_variants(), or '' with all four numbers below
            depth=0,  # 0: from the variant
            hidden_size=0,
            num_heads=0,
            patch_size=0,
            mlp_ratio=4.0,
            num_classes=1000,  # 0: unconditional (no class embedding)
            null_label=True,  # the label table has a null row (label num_classes) for classifier-free guidance
            dtype="float32",  # compute dtype; parameters stay float32
            remat="none",  # per block: none | full (recompute activations in the backward pass) | dots
        )
    )
    for key, value in overrides.items():
        if key not in c:
            raise ValueError(f"dit_model_config: unknown field {key!r}; accepted: {sorted(c)}")
        c[key] = value
    dit_architecture(c.variant, c.depth, c.hidden_size, c.num_heads, c.patch_size)
    c.lock()
    return c


def check_input_size(hw, patch_size: int) -> None:
    """Raise a clear error when H or W is not a multiple of the patch size."""
    bad = [s for s in hw if s % patch_size]
    if bad:
        sizes = "x".join(str(s) for s in hw)
        raise ValueError(
            f"input size {sizes} is not divisible by the DiT patch size {patch_size}; "
            f"use a variant with a smaller patch (model.variant / model.patch_size) or resize the data"
        )


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]; tokens row-major over the grid, each patch (p1, p2, C)-major."""
    return einops.rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(tokens: jax.Array, patch_size: int, grid_hw: Tuple[int, int]) -> jax.Array:
    """Inverse of patchify: [B, h*w, p*p*C] -> [B, h*p, w*p, C]."""
    h, w = grid_hw
    return einops.rearrange(tokens, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c", h=h, w=w, p1=patch_size, p2=patch_size)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[N] positions -> [N, dim]: [sin | cos] at frequencies 10000^(-k / (dim/2)), k < dim/2."""
    if dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_hw: Tuple[int, int]) -> np.ndarray:
    """Fixed position embeddings [h*w, dim] for a grid, tokens in row-major order.

    The first half of each vector encodes the column (w) index and the second half the row (h) index: the
    paper's code builds its grid with np.meshgrid(w, h), so its 'emb_h' half sees w. Matching that keeps
    ported checkpoints exact. Computed in float64 numpy: a constant, never a parameter.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_hw[0]), np.arange(grid_hw[1]), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def dit_timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """[B] (possibly fractional) timesteps -> [B, dim]: [cos | sin] at frequencies max_period^(-k / (dim/2)).

    DiT's layout, which differs from DDPM's (research.models.layers.timestep_embedding: [sin | cos] and
    k / (dim/2 - 1)); a pretrained DiT only works with its own.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x [B, N, D] with per-example shift, scale [B, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(dtype, name):
    # No affine parameters: adaLN supplies the scale and shift.
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens [B, N, D] with a fused, biased qkv projection."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, dim = x.shape
        d = dim // self.num_heads
        qkv = nn.Dense(3 * dim, kernel_init=xavier_init, dtype=self.dtype, name="qkv")(x)
        # [q | k | v], each head-major inside, as timm's Attention (and so the paper's checkpoints) lays it out.
        q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, d), 2, 0)
        out = attention(q, k, v, dtype=self.dtype).reshape(b, n, dim)
        return nn.Dense(dim, kernel_init=xavier_init, dtype=self.dtype, name="proj")(out)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: tokens x [B, N, D], conditioning c [B, D] -> [B, N, D]."""

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        # Zero-initialised, so the gates start at 0 and the block is exactly the identity.
        mod = nn.Dense(6 * dim, kernel_init=zero_init, dtype=self.dtype, name="adaLN")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = modulate(_layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None, :] * SelfAttention(self.num_heads, dtype=self.dtype, name="attn")(h)
        h = modulate(_layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        h = nn.Dense(int(dim * self.mlp_ratio), kernel_init=xavier_init, dtype=self.dtype, name="mlp_fc1")(h)
        h = nn.gelu(h, approximate=True)
        h = nn.Dense(dim, kernel_init=xavier_init, dtype=self.dtype, name="mlp_fc2")(h)
        return x + gate_mlp[:, None, :] * h


class FinalLayer(nn.Module):
    """adaLN (shift, scale) and a linear map to p*p*out_channels per token; both zero-initialised."""

    patch_size: int
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        mod = nn.Dense(2 * dim, kernel_init=zero_init, dtype=self.dtype, name="adaLN")(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(_layer_norm(self.dtype, "norm")(x), shift, scale)
        return nn.Dense(self.patch_size**2 * self.out_channels, kernel_init=zero_init, dtype=self.dtype, name="proj")(x)


class DiT(nn.Module):
    """Class-conditional (or unconditional, num_classes=0) Diffusion Transformer.

    Call: model.apply({'params': p}, x, t, cond=None, train=False) with x [B, H, W, C] (H, W multiples of the
    patch size), t [B] timesteps (training indices, may be fractional) and cond a research.cond.Cond (or, as a
    shorthand, its label array [B] int). DiT uses only cond.label (any other field raises ValueError); a
    class-conditional model requires it. Labels lie in [0, num_classes), plus num_classes, the null label of
    classifier-free guidance, when null_label is True (the table then has num_classes + 1 rows, as in the
    paper's code). Output [B, H, W, out_channels] float32; out_channels = 2 C when the diffusion config learns
    the variance (the trainer decides, as for the U-Net).

    The model never drops labels itself: training replaces them by the null label beforehand with
    research.cond.drop_condition (the paper drops 10%). `train` is accepted for the common model signature;
    DiT has no dropout.
    """

    out_channels: int
    variant: str = "DiT-XL/2"
    depth: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    patch_size: int = 0
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    null_label: bool = True
    dtype: Any = jnp.float32
    remat: Any = "none"  # none | full | dots (layers.REMAT_POLICIES); True / False mean full / none

    def __post_init__(self):
        # Fail when the module is built (validate_config does), not at the first trace.
        dit_architecture(self.variant, self.depth, self.hidden_size, self.num_heads, self.patch_size)
        super().__post_init__()

    @property
    def architecture(self) -> Tuple[int, int, int, int]:
        """(depth, hidden_size, num_heads, patch_size) after resolving the variant."""
        return dit_architecture(self.variant, self.depth, self.hidden_size, self.num_heads, self.patch_size)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond=None, *, train: bool = False):
        cond = as_cond(cond)
        check_supported(cond, ("label",), "DiT")
        depth, dim, heads, p = self.architecture
        b, height, width, _ = x.shape
        check_input_size((height, width), p)
        grid = (height // p, width // p)

        tokens = nn.Dense(dim, kernel_init=xavier_init, dtype=self.dtype, name="patch_embed")(
            patchify(x.astype(self.dtype), p)
        )
        tokens = tokens + jnp.asarray(sincos_2d(dim, grid), jnp.float32)[None].astype(self.dtype)

        c = dit_timestep_embedding(t, 256)
        c = nn.Dense(dim, kernel_init=small_normal_init, dtype=self.dtype, name="t_embed0")(c)
        c = nn.Dense(dim, kernel_init=small_normal_init, dtype=self.dtype, name="t_embed1")(nn.silu(c))
        if self.num_classes:
            if cond is None or cond.label is None:
                raise ValueError("this DiT is class-conditional (num_classes > 0) but no labels were given")
            table = self.num_classes + int(self.null_label)
            embed = nn.Embed(table, dim, embedding_init=small_normal_init, name="label_embed")
            c = c + embed(cond.label).astype(c.dtype)

        block_cls = checkpointed(DiTBlock, self.remat)
        for i in range(depth):
            tokens = block_cls(heads, self.mlp_ratio, dtype=self.dtype, name=f"block{i}")(tokens, c)
        out = FinalLayer(p, self.out_channels, dtype=self.dtype, name="final")(tokens, c)
        return unpatchify(out, p, grid).astype(jnp.float32)
