"""The ADD discriminator: a frozen feature network with small trainable heads (research/diffusion/adversarial.py).

`FeatureNetwork` wraps a frozen backbone as features(params, x, key) -> [feature maps], x in the model range
([-1, 1] for centered data):
  'classifier'  the domain classifier of the data set (research/metrics/classifier.py): the outputs of its
                convolutions (each stage) and of its penultimate dense layer. Trained on the data set itself, it is
                this codebase's stand-in for ADD's DINOv2, a network that knows what the images should look like.
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


def classifier_features(dataset: str, centered: bool = True) -> FeatureNetwork:
    """The domain classifier of `dataset` (trained and cached on first use) as a feature network."""
    from research.metrics.classifier import SmallCNN, get_domain_classifier

    clf = get_domain_classifier(dataset, progress=False)
    net = SmallCNN.from_recipe(clf.recipe)
    names = [f"Conv_{i}" for i in range(len(clf.recipe.widths) * clf.recipe.convs_per_stage)] + ["features"]

    def features(params, x, key=None, labels=None):
        x = x if centered else 2.0 * x - 1.0
        return capture(net, {"params": params}, names, x, train=False)

    size, ch = clf.recipe.image_size, clf.recipe.channels
    shapes = [f.shape for f in jax.eval_shape(lambda p: features(p, jnp.zeros((1, size, size, ch))), clf.params)]
    reference = {"kind": "classifier", "name": clf.name, "sha256": clf.checksum, "layers": names}
    return FeatureNetwork("classifier", features, clf.params, reference, shapes)


def teacher_features(model, params, schedule, model_config, image_shape, feature_t: int, reference: dict):
    """The teacher U-Net's encoder features at timestep feature_t (x re-noised with the key's noise)."""
    from research.cond import Cond
    from research.diffusion import gaussian

    if model_config.get("name") != "unet":
        raise ValueError(f"the 'teacher' feature network reads a 'unet' teacher's encoder, not {model_config['name']}")
    levels, blocks = len(model_config["ch_mult"]), int(model_config["num_res_blocks"])
    names = [f"down{level}_res{blocks - 1}" for level in range(levels)] + ["mid_res1"]
    conditional = bool(model_config.get("num_classes", 0))

    def features(p, x, key, labels=None):
        b = x.shape[0]
        t = jnp.full((b,), int(feature_t), jnp.int32)
        x_t = gaussian.q_sample(schedule, x, t, jax.random.normal(key, x.shape, x.dtype))
        cond = Cond(label=labels) if conditional else None
        return capture(model, {"params": p}, names, x_t, t, cond, train=False)

    labels = jnp.zeros((1,), jnp.int32)
    shapes = [
        f.shape
        for f in jax.eval_shape(
            lambda p: features(p, jnp.zeros((1, *image_shape)), jax.random.PRNGKey(0), labels), params
        )
    ]
    return FeatureNetwork("teacher", features, params, dict(reference, layers=names, feature_t=int(feature_t)), shapes)


__all__ = [
    "FEATURE_NETWORKS",
    "DiscriminatorHeads",
    "FeatureNetwork",
    "ProjectionHead",
    "capture",
    "classifier_features",
    "teacher_features",
]
