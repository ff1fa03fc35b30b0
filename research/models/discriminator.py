"""The ADD discriminator: a frozen feature network with small trainable heads (research/diffusion/adversarial.py).

`FeatureNetwork` wraps a frozen backbone as features(params, x, key) -> [feature maps], x in the model range
([-1, 1] for centered data):
  'classifier'  the domain classifier of the data set (research/metrics/classifier.py): the outputs of its
                convolutions (each stage) and of its penultimate dense layer. Trained on the data set itself, it is
                this codebase's stand-in for ADD's DINOv2, a network that knows what the images should look like.
                Built, like 'teacher', by research/tasks/add.py (metrics and the diffusion math are not models).
  'teacher'     the frozen diffusion teacher's own encoder (its U-Net's last ResBlock of every level and the middle
                block) run on the input re-noised to timestep feature_t, as latent ADD (Sauer et al. 2024) reads
                the teacher's features instead of a pixel-space network's.

`DiscriminatorHeads` puts one `ProjectionHead` on each feature map: two 1x1 layers (token-wise dense layers) with
leaky ReLU, a logit per token, and for class-conditional data the projection term <embed(label), h> / sqrt(width)
(Miyato & Koyama 2018, as ADD conditions its heads). Logits per head: [B, tokens].
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

FEATURE_NETWORKS = ("classifier", "teacher")


class ProjectionHead(nn.Module):
    width: int = 64
    num_classes: int = 0

    @nn.compact
    def __call__(self, features: jax.Array, labels=None) -> jax.Array:
        f = features.reshape(features.shape[0], -1, features.shape[-1])
        f = f.astype(jnp.promote_types(f.dtype, jnp.float32))  # bfloat16 features are read in float32
        h = nn.leaky_relu(nn.Dense(self.width, name="dense0")(f), 0.2)
        h = nn.leaky_relu(nn.Dense(self.width, name="dense1")(h), 0.2)
        out = nn.Dense(1, name="out")(h)[..., 0]
        if self.num_classes:
            if labels is None:
                raise ValueError("a class-conditional discriminator head needs the labels")
            e = nn.Embed(self.num_classes, self.width, name="label_embed")(labels)
            out = out + jnp.einsum("bnc,bc->bn", h, e) / math.sqrt(self.width)
        return out


class DiscriminatorHeads(nn.Module):
    """One ProjectionHead per feature map: __call__(features [list of [B, ..., C]], labels [B] or None) -> list of
    logits [B, tokens]."""

    num_heads: int
    width: int = 64
    num_classes: int = 0

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], labels=None) -> list:
        if len(features) != self.num_heads:
            raise ValueError(f"{len(features)} feature maps for {self.num_heads} discriminator heads")
        return [
            ProjectionHead(self.width, self.num_classes, name=f"head{i}")(f, labels) for i, f in enumerate(features)
        ]


def _captured(intermediates: dict, names: Sequence[str]) -> list:
    out = []
    for name in names:
        if name not in intermediates:
            raise ValueError(f"the feature network has no layer {name!r}; it has {sorted(intermediates)}")
        out.append(intermediates[name]["__call__"][0])
    return out


def capture(module: nn.Module, variables: dict, names: Sequence[str], *args, **kwargs) -> list:
    """The outputs of the top-level submodules `names` of `module` applied to args (in that order)."""
    names = tuple(names)
    _, state = module.apply(
        variables,
        *args,
        capture_intermediates=lambda m, method: method == "__call__" and m.name in names and len(m.path) == 1,
        mutable=["intermediates"],
        **kwargs,
    )
    return _captured(state["intermediates"], names)


class FeatureNetwork:
    """A frozen backbone: `features(params, x, key, labels)` -> list of feature maps; `params` is what the task
    holds frozen; `reference` describes where they came from (checkpoint metadata)."""

    def __init__(self, kind: str, features: Callable, params: Any, reference: dict, shapes: Sequence):
        self.kind, self.features, self.params, self.reference = kind, features, params, reference
        self.shapes = list(shapes)

    @property
    def num_heads(self) -> int:
        return len(self.shapes)


__all__ = [
    "FEATURE_NETWORKS",
    "DiscriminatorHeads",
    "FeatureNetwork",
    "ProjectionHead",
    "capture",
]
