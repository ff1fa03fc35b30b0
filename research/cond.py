"""The conditioning a denoiser receives: one pytree, `Cond`, passed as the model's third argument.

    model.apply({'params': p}, x [B, H, W, C], t [B], cond: Cond | None, train=...)

Every field is optional (None = absent); a model declares which fields it uses and rejects the others with
`check_supported`, so a condition is never silently ignored. Because `Cond` is a flax.struct dataclass it is a
pytree: it passes through jit, lax.scan and the samplers like an array, and a None field is simply no leaf.

Classifier-free guidance (Ho & Salimans 2022) trains one network on both the conditional and the unconditional
task by replacing the condition with a null one at random: `drop_condition` does that before the model is
called (the models themselves no longer drop anything), and `null_cond_like` builds the all-null condition for
the unconditional branch at sampling time.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import struct

Array = Any

FIELDS = ("label", "text", "text_mask", "pooled_text", "hint", "residuals")

# What a model that takes each field is, for the error message of check_supported.
_TAKES = {
    "label": "class labels",
    "text": "text",
    "text_mask": "text",
    "pooled_text": "pooled text embeddings",
    "hint": "a control image (hint)",
    "residuals": "ControlNet residuals",
}


@struct.dataclass
class Cond:
    """Conditioning of a batch of B examples; any subset of the fields may be set.

    label        [B] int32 class labels (a class-conditional model's null label is num_classes).
    text         [B, L, D] float token embeddings from a text encoder.
    text_mask    [B, L] bool, True where the token is real (False = padding); None means every token is real.
    pooled_text  [B, D] a pooled text embedding (e.g. CLIP's projected EOS token).
    hint         [B, H, W, C] a spatial control image (ControlNet's input).
    residuals    {'down': tuple of [B, h, w, c], one per U-Net skip in the order the U-Net stores them,
                  'mid': [B, h, w, c]}: ControlNet's outputs, added to the U-Net's skips and middle output.
    """

    label: Optional[Array] = None
    text: Optional[Array] = None
    text_mask: Optional[Array] = None
    pooled_text: Optional[Array] = None
    hint: Optional[Array] = None
    residuals: Optional[Dict[str, Any]] = None

    @classmethod
    def from_label(cls, y: Array) -> "Cond":
        return cls(label=y)


def fields_set(cond: Optional[Cond]) -> Tuple[str, ...]:
    """Names of the fields that are not None, in declaration order; () for a None cond."""
    if cond is None:
        return ()
    return tuple(name for name in FIELDS if getattr(cond, name) is not None)


def as_cond(x: Any) -> Optional[Cond]:
    """Normalise a model's third argument: None -> None, a Cond -> itself, an integer array [B] -> Cond(label=x).

    The integer-array form is a convenience for callers that only ever have class labels (older training and
    sampling code, tests): `model.apply(v, x, t, y)` and `model.apply(v, x, t, Cond(label=y))` are the same call.
    Works on traced arrays too, so it can be called inside a jitted model.
    """
    if x is None or isinstance(x, Cond):
        return x
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.integer):
        return Cond(label=x)
    raise TypeError(
        f"the model's conditioning argument must be None, a research.cond.Cond, or an integer label "
        f"array; got {type(x).__name__}{'' if dtype is None else f' of dtype {dtype}'} "
        f"(wrap other conditions in Cond(...))"
    )


def check_supported(cond: Optional[Cond], supported: Iterable[str], model: str) -> None:
    """Raise ValueError when cond sets a field outside `supported` (the fields `model` knows how to use)."""
    supported = tuple(supported)
    for name in fields_set(cond):
        if name not in supported:
            raise ValueError(
                f"{model} does not use cond.{name} (it supports: {', '.join(supported) or 'nothing'}); "
                f"remove it or use a model that takes {_TAKES[name]}"
            )


def batch_size(cond: Optional[Cond]) -> Optional[int]:
    """B of the droppable fields (label, text, pooled_text); None when none of them is set.

    Raises ValueError when two of them disagree.
    """
    sizes = {
        name: getattr(cond, name).shape[0]
        for name in ("label", "text", "text_mask", "pooled_text")
        if cond is not None and getattr(cond, name) is not None
    }
    if len(set(sizes.values())) > 1:
        raise ValueError(f"Cond fields have different batch sizes: {sizes}; give every field the same B")
    return next(iter(sizes.values()), None)


def _replace_where(cond: Cond, drop: Array, null_label, null_text, null_text_mask, null_pooled) -> Cond:
    """Replace label, text (+ mask) and pooled_text by their null values where drop [B] is True."""
    updates = {}
    if cond.label is not None:
        if null_label is None:
            raise ValueError(
                "cond.label is set but no null_label was given: pass null_label=num_classes (the "
                "model's null class; it needs model.null_label=True)"
            )
        updates["label"] = jnp.where(drop, jnp.asarray(null_label, cond.label.dtype), cond.label)
    if cond.text is not None:
        b, length, _ = cond.text.shape
        if null_text is None:
            # Zero tokens with only the first one attended: an empty prompt that no text encoder produces.
            text = jnp.zeros(cond.text.shape[1:], cond.text.dtype)
            mask = jnp.arange(length) == 0
        else:
            null_text = jnp.asarray(null_text, cond.text.dtype)
            if null_text.shape != cond.text.shape[1:]:
                raise ValueError(
                    f"null_text has shape {null_text.shape}; it must be [L, D] = {cond.text.shape[1:]}, "
                    f"the text encoder's output for the empty prompt"
                )
            text = null_text
            mask = jnp.ones((length,), bool) if null_text_mask is None else jnp.asarray(null_text_mask, bool)
        updates["text"] = jnp.where(drop[:, None, None], text[None], cond.text)
        kept_mask = jnp.ones((b, length), bool) if cond.text_mask is None else cond.text_mask.astype(bool)
        updates["text_mask"] = jnp.where(drop[:, None], mask[None], kept_mask)
    if cond.pooled_text is not None:
        pooled = (
            jnp.zeros(cond.pooled_text.shape[1:], cond.pooled_text.dtype)
            if null_pooled is None
            else jnp.asarray(null_pooled, cond.pooled_text.dtype)
        )
        updates["pooled_text"] = jnp.where(drop[:, None], pooled[None], cond.pooled_text)
    return cond.replace(**updates)


def drop_condition(
    cond: Optional[Cond],
    key: jax.Array,
    prob: float,
    *,
    null_label: Optional[int] = None,
    null_text: Optional[Array] = None,
    null_text_mask: Optional[Array] = None,
    null_pooled: Optional[Array] = None,
) -> Optional[Cond]:
    """Classifier-free guidance's condition dropout, applied in training before the model is called.

    One Bernoulli(prob) draw per example, shared by all fields, so a dropped example loses its whole condition:
      label       -> null_label (an int, normally num_classes; required when cond.label is set and prob > 0)
      text        -> null_text [L, D] broadcast over the batch (the encoder's empty-prompt embedding), its mask ->
                     null_text_mask [L] (default: all True); with null_text=None the text is zeroed and the mask
                     keeps only the first token. A dropped cond always carries a text_mask ([B, L] bool).
      pooled_text -> null_pooled [D] (default zeros)
    hint and residuals are left untouched (ControlNet keeps its control in both guidance branches).
    prob must be a Python number in [0, 1]; prob == 0 returns cond itself (key unused). None -> None.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"condition dropout probability {prob} must be in [0, 1]")
    if cond is None or prob == 0:
        return cond
    b = batch_size(cond)
    if b is None:
        return cond
    drop = jax.random.bernoulli(key, prob, (b,))
    return _replace_where(cond, drop, null_label, null_text, null_text_mask, null_pooled)


def null_cond_like(
    cond: Optional[Cond],
    *,
    null_label: Optional[int] = None,
    null_text: Optional[Array] = None,
    null_text_mask: Optional[Array] = None,
    null_pooled: Optional[Array] = None,
) -> Optional[Cond]:
    """The all-null version of cond (the unconditional branch of guidance): drop_condition with prob 1.

    Same null values and rules as drop_condition; hint and residuals are kept. None -> None.
    """
    if cond is None:
        return None
    b = batch_size(cond)
    if b is None:
        return cond
    return _replace_where(cond, jnp.ones((b,), bool), null_label, null_text, null_text_mask, null_pooled)
