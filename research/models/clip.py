"""CLIP (Radford et al. 2021) in Flax linen: a causal text transformer, a ViT image encoder, their projections to a
shared embedding space, and the contrastive (CLIP) and sigmoid (SigLIP, Zhai et al. 2023) losses.

The architecture is transformers' CLIPModel, so released weights load without change
(research/pretrained/convert_clip.py). Parameter tree of `CLIP` and the transformers state_dict key of each leaf
(`T.` = `text_model.`, `V.` = `vision_model.`; Linear weights [out, in] are transposed to kernels [in, out], the
patch Conv2d weight [O, I, kh, kw] to [kh, kw, I, O]; LayerNorm weight -> scale):

    text/token_embedding/embedding        T.embeddings.token_embedding.weight      [vocab, width]
    text/position_embedding               T.embeddings.position_embedding.weight   [context_length, width]
    text/block_{i}/ln1, ln2               T.encoder.layers.{i}.layer_norm1, layer_norm2
    text/block_{i}/q, k, v, out           T.encoder.layers.{i}.self_attn.q_proj, k_proj, v_proj, out_proj
    text/block_{i}/fc1, fc2               T.encoder.layers.{i}.mlp.fc1, mlp.fc2
    text/final_norm                       T.final_layer_norm
    vision/patch_embed/kernel             V.embeddings.patch_embedding.weight      [p, p, C, width]
    vision/class_embedding                V.embeddings.class_embedding             [width]
    vision/position_embedding             V.embeddings.position_embedding.weight   [1 + (size/p)^2, width]
    vision/pre_norm, post_norm            V.pre_layrnorm, V.post_layernorm
    vision/block_{i}/...                  V.encoder.layers.{i}... (as in the text tower)
    image_projection/kernel               visual_projection.weight                 [vision width, embed_dim]
    text_projection/kernel                text_projection.weight                   [text width, embed_dim]
    logit_scale                           logit_scale                              []
    logit_bias (only with logit_bias_init; SigLIP)

params['text'] alone is the parameter tree of a `CLIPTextTransformer` with `text_tower_fields(fields)`, so a
trained CLIP's text tower can serve as a diffusion model's text encoder.

Initialisation follows OpenAI's CLIP.initialize_parameters (applied to both towers): token embeddings N(0, 0.02),
text positions N(0, 0.01), class / image positions / projections N(0, width^-0.5), attention inputs width^-0.5,
attention outputs and fc2 width^-0.5 (2 layers)^-0.5, fc1 (2 width)^-0.5, biases 0.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.models.layers import attention

Dtype = Any

LOG_100 = math.log(100.0)

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the exact, erf form
}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"CLIP act={name!r} is not supported; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + fc2(act(fc1(LN(x)))). x [B, N, width]."""

    width: int
    heads: int
    mlp_dim: int
    act: str
    layers: int  # of the whole tower: sets the residual-branch output scale at init
    layer_norm_eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        if self.width % self.heads:
            raise ValueError(f"CLIP: width {self.width} does not split into {self.heads} heads")
        b, n, w = x.shape
        d = w // self.heads
        attn_std, proj_std = w**-0.5, w**-0.5 * (2 * self.layers) ** -0.5

        def dense(features, std, name):
            return nn.Dense(features, kernel_init=_normal(std), dtype=self.dtype, name=name)

        ln = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)
        h = ln("ln1")(x)
        q, k, v = (dense(w, attn_std, name)(h).reshape(b, n, self.heads, d) for name in ("q", "k", "v"))
        h = attention(q, k, v, mask=mask, dtype=self.dtype).reshape(b, n, w)
        x = x + dense(w, proj_std, "out")(h)
        h = ln("ln2")(x)
        h = _activation(self.act)(dense(self.mlp_dim or 4 * w, (2 * w) ** -0.5, "fc1")(h))
        return x + dense(w, proj_std, "fc2")(h)


def _blocks(tower, x: jax.Array, mask) -> list:
    """The outputs of every block of a tower (a module with width, heads, mlp_dim, act, layers, layer_norm_eps,
    dtype), built as its submodules block_0 ... block_{layers - 1} from inside its compact method."""
    outputs = []
    for i in range(tower.layers):
        x = _Block(
            tower.width,
            tower.heads,
            tower.mlp_dim,
            tower.act,
            tower.layers,
            tower.layer_norm_eps,
            tower.dtype,
            name=f"block_{i}",
        )(x, mask)
        outputs.append(x)
    return outputs


class CLIPTextTransformer(nn.Module):
    """CLIP's text encoder: token + learned position embeddings, causal pre-norm blocks, final layer norm.

    tokens [B, L] int32 with L <= context_length. Returns (hidden [B, L, width], pooled [B, width]):
    hidden is the final layer norm applied to the output of block `output_layer` (a negative index: -1 the last
    block, as SD 1.x conditions on; -2 the penultimate, as SD 2.x does); pooled is always the last block's final-LN
    hidden state at the first position whose token is eos_token_id (a sequence without one pools position 0).
    As in transformers, a config with the pre-2023 eos_token_id == 2 pools at argmax(tokens) instead (the EOS
    token 49407 is the largest id of the original vocabulary).
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 0  # 0: 4 * width
    act: str = "quick_gelu"  # OpenAI CLIP; OpenCLIP models use "gelu"
    eos_token_id: int = 49407
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, *, output_layer: int = -1):
        if tokens.ndim != 2:
            raise ValueError(f"CLIPTextTransformer: tokens have shape {tokens.shape}; expected [B, L]")
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"CLIPTextTransformer: {length} tokens exceed context_length={self.context_length}")
        if not -self.layers <= output_layer <= -1:
            raise ValueError(f"CLIPTextTransformer: output_layer={output_layer}; give -1 .. -{self.layers}")
        tokens = tokens.astype(jnp.int32)
        embed = nn.Embed(self.vocab_size, self.width, embedding_init=_normal(0.02), name="token_embedding")
        pos = self.param("position_embedding", _normal(0.01), (self.context_length, self.width), jnp.float32)
        x = (embed(tokens) + pos[:length]).astype(self.dtype)
        causal = jnp.tril(jnp.ones((length, length), bool))
        outputs = _blocks(self, x, causal)
        final_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="final_norm")
        last = final_norm(outputs[-1])
        hidden = last if output_layer == -1 else final_norm(outputs[output_layer])
        if self.eos_token_id == 2:
            index = jnp.argmax(tokens, axis=-1)
        else:
            index = jnp.argmax(tokens == self.eos_token_id, axis=-1)  # argmax returns the first True
        pooled = jnp.take_along_axis(last, index[:, None, None], axis=1)[:, 0]
        return hidden, pooled


class CLIPVisionTransformer(nn.Module):
    """CLIP's image encoder (ViT): patch conv without bias, class token, learned positions, pre-LN, blocks,
    post-LN on the class token.

    images [B, image_size, image_size, C] (any C; the released models take 3 already-normalised channels, as
    transformers' pixel_values). Returns (hidden [B, 1 + (image_size / patch_size)^2, width], pooled [B, width]);
    hidden is the last block's output without the post-LN, as transformers' last_hidden_state.
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 0  # 0: 4 * width
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array):
        if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"CLIPVisionTransformer: images have shape {images.shape}; expected [B, {self.image_size}, "
                f"{self.image_size}, C]"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIP: image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        scale = self.width**-0.5
        p = self.patch_size
        x = nn.Conv(
            self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype, name="patch_embed"
        )(images.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, self.width)  # row-major over the patch grid, as transformers' flatten(2)
        cls = self.param("class_embedding", _normal(scale), (self.width,), jnp.float32)
        pos = self.param("position_embedding", _normal(scale), (x.shape[1] + 1, self.width), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], axis=1)
        x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="pre_norm")(x + pos.astype(x.dtype))
        x = _blocks(self, x, None)[-1]
        pooled = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="post_norm")(x[:, 0])
        return x, pooled


class CLIP(nn.Module):
    """Image and text encoders with linear projections (no bias) to a shared embed_dim space.

    encode_image(images [B, H, W, C]) -> [B, embed_dim]; encode_text(tokens [B, L]) -> [B, embed_dim]; neither is
    L2-normalised (the losses normalise). __call__(images, tokens) -> dict(image, text, logit_scale, logit_bias):
    logit_scale is the raw learned log temperature (the logits are exp(logit_scale) * cosine similarity);
    logit_bias is None unless logit_bias_init is set (SigLIP's learned bias). init through __call__ creates every
    parameter. Field names are flat so that a config section builds the model (research.models.build_model).
    """

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 0
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 0
    act: str = "quick_gelu"
    eos_token_id: int = 49407
    layer_norm_eps: float = 1e-5
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: Optional[float] = None
    out_channels: int = 0  # build_model passes the data's channels; a CLIP has no image output
    dtype: Dtype = jnp.float32

    def setup(self):
        self.vision = CLIPVisionTransformer(
            self.image_size,
            self.patch_size,
            self.vision_width,
            self.vision_layers,
            self.vision_heads,
            self.vision_mlp_dim,
            self.act,
            self.layer_norm_eps,
            self.dtype,
        )
        self.text = CLIPTextTransformer(**text_tower_fields(self), dtype=self.dtype)
        self.image_projection = nn.Dense(
            self.embed_dim, use_bias=False, kernel_init=_normal(self.vision_width**-0.5), dtype=self.dtype
        )
        self.text_projection = nn.Dense(
            self.embed_dim, use_bias=False, kernel_init=_normal(self.text_width**-0.5), dtype=self.dtype
        )
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), (), jnp.float32)
        if self.logit_bias_init is not None:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), (), jnp.float32)
        else:
            self.logit_bias = None

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> [B, embed_dim] (not normalised)."""
        return self.image_projection(self.vision(images)[1])

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] -> [B, embed_dim] (not normalised)."""
        return self.text_projection(self.text(tokens)[1])

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict:
        return dict(
            image=self.encode_image(images),
            text=self.encode_text(tokens),
            logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
        )


def text_tower_fields(fields) -> dict:
    """CLIPTextTransformer fields (without dtype) of a CLIP given as a module or a dict of its fields."""
    if isinstance(fields, CLIP):
        get = lambda k: getattr(fields, k)
    else:
        get = lambda k: fields[k] if k in fields else getattr(CLIP, k)
    return dict(
        vocab_size=get("vocab_size"),
        context_length=get("context_length"),
        width=get("text_width"),
        layers=get("text_layers"),
        heads=get("text_heads"),
        mlp_dim=get("text_mlp_dim"),
        act=get("act"),
        eos_token_id=get("eos_token_id"),
        layer_norm_eps=get("layer_norm_eps"),
    )


# --- losses ------------------------------------------------------------------------------------------------------


def _normalise(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """CLIP's symmetric cross-entropy over the whole batch. image_emb, text_emb [B, D] (pair i matches i).

    Both are L2-normalised; logits = exp(min(logit_scale, log 100)) * img @ txt.T [B, B]; the loss is the mean of
    the image->text and text->image cross-entropies with the diagonal as labels. Under jax.jit with batch-sharded
    inputs XLA all-gathers the embeddings for the [B, B] product and the gradient flows back through the gather,
    so the value and gradients equal the one-device ones (the global batch is the set of negatives).

    The clamp: OpenAI clips the parameter to [0, log 100] after every optimiser step (`clamp_logit_scale`). The min
    here additionally keeps the loss itself within the clamp whatever the caller does; with the post-step clamp in
    place it changes nothing, as the parameter never exceeds log 100.
    """
    img, txt = _normalise(image_emb), _normalise(text_emb)
    scale = jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), LOG_100))
    logits = scale * img @ txt.T
    labels = jnp.arange(logits.shape[0])
    per_image = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1)
    per_text = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0)
    return 0.5 * (jnp.mean(per_image) + jnp.mean(per_text))


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array) -> jax.Array:
    """SigLIP's pairwise sigmoid loss. image_emb, text_emb [B, D] (pair i matches i).

    logits = exp(logit_scale) * img @ txt.T + logit_bias on L2-normalised embeddings; labels +1 on the diagonal,
    -1 elsewhere; loss = -(1/B) sum_ij log sigmoid(label_ij * logit_ij) (the paper's normalisation: a mean over
    images of the sum over texts). SigLIP does not clamp its temperature (big_vision initialises logit_scale at
    log 10 and logit_bias at -10).
    """
    img, txt = _normalise(image_emb), _normalise(text_emb)
    logits = jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * img @ txt.T + jnp.asarray(logit_bias, jnp.float32)
    labels = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def clamp_logit_scale(params, max_value: float = LOG_100):
    """params (the CLIP's parameter dict, or {'params': ...}) with logit_scale clipped to [0, max_value].

    Applied after every optimiser step, as OpenAI's training does: the parameter then stays where the loss's
    gradient still reaches it.
    """
    if "logit_scale" not in params and "params" in params:
        return {**params, "params": clamp_logit_scale(params["params"], max_value)}
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, max_value)}


# --- named architectures -----------------------------------------------------------------------------------------

_ARCHITECTURES = {
    # OpenAI's released models (transformers' openai/clip-vit-*): 224 px, text 12 layers, 77 tokens.
    "ViT-B/32": dict(
        embed_dim=512,
        patch_size=32,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        text_width=512,
        text_layers=12,
        text_heads=8,
    ),
    "ViT-L/14": dict(
        embed_dim=768,
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        text_width=768,
        text_layers=12,
        text_heads=12,
    ),
}
_ARCHITECTURES["ViT-B/16"] = {**_ARCHITECTURES["ViT-B/32"], "patch_size": 16}


def named_architecture(name: str) -> dict:
    """CLIP fields of a named architecture: OpenAI's 'ViT-B/32', 'ViT-B/16', 'ViT-L/14' (224 px), or 'tiny'
    (28x28 single-channel images in 7x7 patches, width 128, 4 layers of 4 heads in both towers, 16 tokens of
    the CLIP vocabulary, embed_dim 128: MNIST-scale experiments)."""
    if name == "tiny":
        return dict(
            embed_dim=128,
            image_size=28,
            patch_size=7,
            vision_width=128,
            vision_layers=4,
            vision_heads=4,
            vision_mlp_dim=0,
            vocab_size=49408,
            context_length=16,
            text_width=128,
            text_layers=4,
            text_heads=4,
            text_mlp_dim=0,
            act="quick_gelu",
            eos_token_id=49407,
            layer_norm_eps=1e-5,
        )
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown CLIP architecture {name!r}; choose one of {sorted(_ARCHITECTURES) + ['tiny']}")
    return dict(
        image_size=224,
        vision_mlp_dim=0,
        vocab_size=49408,
        context_length=77,
        text_mlp_dim=0,
        act="quick_gelu",
        eos_token_id=49407,
        layer_norm_eps=1e-5,
        **_ARCHITECTURES[name],
    )


def stable_diffusion_text_encoder(version: str) -> dict:
    """CLIPTextTransformer fields of Stable Diffusion's text encoders: version '1' (SD 1.x: OpenAI CLIP ViT-L/14's
    text tower, width 768, 12 layers, quick-GELU) or '2' (SD 2.x: OpenCLIP ViT-H/14's text tower, width 1024, GELU,
    of which the released pipelines keep 23 of the 24 layers: SD 2 conditions on the penultimate layer, after the
    final layer norm, and diffusers ships the encoder already cut there)."""
    common = dict(vocab_size=49408, context_length=77, mlp_dim=0, eos_token_id=49407, layer_norm_eps=1e-5)
    if version == "1":
        return dict(width=768, layers=12, heads=12, act="quick_gelu", **common)
    if version == "2":
        return dict(width=1024, layers=23, heads=16, act="gelu", **common)
    raise ValueError(f"Stable Diffusion text encoder version {version!r}; choose '1' (v1.x) or '2' (v2.x)")


def count_params(tree) -> int:
    """Number of scalars in a parameter tree (arrays or jax.ShapeDtypeStruct leaves)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))
