"""CLIP evaluation: zero-shot classification, retrieval recall, linear probes and CLIPScore, as pure functions.

Everything here takes embeddings (numpy or JAX arrays, as the encoders return them, not normalised) and returns
Python floats or numpy arrays; ``embed_in_batches`` runs a jitted encoder over a whole split. Similarities are
cosines: every function normalises its inputs (``normalize=False`` ranks by raw dot products instead).

Ties. A rank counts every competitor whose similarity is *greater than or equal to* the correct one's, so a tie
is scored as a miss at the tied position: an encoder that maps everything to one vector gets recall@k = 0 for
k < N and zero-shot accuracy 0, never the 1/C a lucky argmax would give. Only exact equality counts as a tie; two
mathematically equal cosines computed in floating point may differ in the last bit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "l2_normalize",
    "zeroshot_classifier",
    "zeroshot_accuracy",
    "retrieval_recall",
    "retrieval_recall_multi",
    "LinearProbeResult",
    "linear_probe",
    "linear_probe_result",
    "DEFAULT_PROBE_C",
    "clip_score",
    "mean_clip_score",
    "embed_in_batches",
]

# CLIP (Radford et al. 2021, App. A.3) sweeps the inverse regularisation C over 1e-6..1e6; on standardized
# features of a small CLIP the optimum lies well inside this narrower grid.
DEFAULT_PROBE_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
_ROW_CHUNK = 1024  # rows of a similarity matrix held at once: N x N for 10k examples would be 400 MB


def l2_normalize(x: Any, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """``x / ||x||`` along ``axis`` as a float64 numpy array (a zero vector stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def _prepare(x: Any, normalize: bool) -> np.ndarray:
    return l2_normalize(x) if normalize else np.asarray(x, dtype=np.float64)


def zeroshot_classifier(text_emb: Any) -> np.ndarray:
    """CLIP's prompt ensemble: [C, T, D] text embeddings (class c, template t) -> [C, D] unit class embeddings.

    Each template's embedding is L2-normalised, the T of a class are averaged, and the mean is normalised again."""
    text_emb = np.asarray(text_emb)
    if text_emb.ndim != 3:
        raise ValueError(f"text_emb must be [classes, templates, dim], got shape {text_emb.shape}")
    return l2_normalize(l2_normalize(text_emb).mean(axis=1)).astype(np.float32)


def _ranks(queries: np.ndarray, keys: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank of key ``targets[i]`` for query i: the number of other keys scoring >= it (0 = unambiguous first)."""
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), _ROW_CHUNK):
        sim = queries[start : start + _ROW_CHUNK] @ keys.T
        rows = np.arange(len(sim))
        correct = sim[rows, targets[start : start + _ROW_CHUNK]]
        # >= counts the target itself once: subtract it.
        ranks[start : start + len(sim)] = (sim >= correct[:, None]).sum(axis=1) - 1
    return ranks


def zeroshot_accuracy(
    image_emb: Any, labels: Any, class_emb: Any, ks: Sequence[int] = (1, 5), normalize: bool = True
) -> dict[str, float]:
    """Zero-shot top-k accuracy: image embeddings [N, D], labels int [N], class embeddings [C, D].

    Returns ``{'top1': ..., 'top5': ...}`` (a top-k only for k <= C). An image is correct at k when fewer than k
    other classes score at least as high as its own (ties count against it)."""
    image_emb, class_emb = _prepare(image_emb, normalize), _prepare(class_emb, normalize)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(image_emb),):
        raise ValueError(f"labels must be [N] = [{len(image_emb)}], got shape {labels.shape}")
    num_classes = len(class_emb)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    ranks = _ranks(image_emb, class_emb, labels)
    return {f"top{k}": float(np.mean(ranks < k)) for k in ks if k <= num_classes}


def retrieval_recall_multi(
    image_emb: Any, text_emb: Any, text_to_image: Any, ks: Sequence[int] = (1, 5), normalize: bool = True
) -> dict[str, float]:
    """Recall@k with several captions per image: images [N, D], texts [M, D], ``text_to_image`` int [M] (the image
    each text describes).

    image->text: an image is found at k when fewer than k non-matching texts score at least as high as its best
    matching text (COCO/Flickr convention: any of its captions counts). Images without a caption are skipped.
    text->image: a text is found at k when fewer than k other images score at least as high as its own image.
    Keys: ``'i2t@k'`` and ``'t2i@k'``."""
    img, txt = _prepare(image_emb, normalize), _prepare(text_emb, normalize)
    owner = np.asarray(text_to_image, dtype=np.int64)
    if owner.shape != (len(txt),):
        raise ValueError(f"text_to_image must be [M] = [{len(txt)}], got shape {owner.shape}")
    t2i = _ranks(txt, img, owner)

    captioned = np.unique(owner)
    i2t = np.empty(len(captioned), dtype=np.int64)
    for start in range(0, len(captioned), _ROW_CHUNK):
        ids = captioned[start : start + _ROW_CHUNK]
        sim = img[ids] @ txt.T
        match = owner[None, :] == ids[:, None]
        best = np.where(match, sim, -np.inf).max(axis=1)
        i2t[start : start + len(ids)] = ((sim >= best[:, None]) & ~match).sum(axis=1)

    out = {}
    for k in ks:
        out[f"i2t@{k}"] = float(np.mean(i2t < k))
        out[f"t2i@{k}"] = float(np.mean(t2i < k))
    return out


def retrieval_recall(
    image_emb: Any, text_emb: Any, ks: Sequence[int] = (1, 5), normalize: bool = True
) -> dict[str, float]:
    """Recall@k for paired data: image i [N, D] and text i [N, D] are the one match.

    ``'i2t@k'``: the fraction of images whose own text is among the k best, ``'t2i@k'`` the converse; a tie with
    a wrong candidate counts against the match."""
    n = len(np.asarray(image_emb))
    if len(np.asarray(text_emb)) != n:
        raise ValueError(f"paired retrieval needs as many texts as images, got {len(text_emb)} and {n}")
    return retrieval_recall_multi(image_emb, text_emb, np.arange(n), ks, normalize)


def class_retrieval(
    image_emb: Any, image_labels: Any, text_emb: Any, text_labels: Any, ks: Sequence[int] = (1, 5), normalize=True
) -> dict[str, float]:
    """Retrieval on class-captioned data, where many captions describe the same class and a pairing of image i
    with caption i would make identical captions tie: images [N, D] with labels [N], captions [M, D] with the
    class they name [M].

    ``'i2t@k'``: the fraction of images with a caption of their class among their k most similar captions;
    ``'t2i@k'``: the fraction of captions with an image of their class among their k most similar images
    (precision at the first hit). Ties between candidates are broken by index."""
    img, txt = _prepare(image_emb, normalize), _prepare(text_emb, normalize)
    img_y, txt_y = np.asarray(image_labels, np.int64), np.asarray(text_labels, np.int64)
    if img_y.shape != (len(img),) or txt_y.shape != (len(txt),):
        raise ValueError(
            f"labels must be [N] and [M]; got {img_y.shape} for {len(img)} images, {txt_y.shape} for "
            f"{len(txt)} captions"
        )

    def hits(queries, query_y, keys, key_y, k):
        found = np.empty(len(queries), bool)
        for start in range(0, len(queries), _ROW_CHUNK):
            sim = queries[start : start + _ROW_CHUNK] @ keys.T
            top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
            found[start : start + len(sim)] = (key_y[top] == query_y[start : start + len(sim), None]).any(axis=1)
        return found

    out = {}
    for k in ks:
        out[f"i2t@{k}"] = float(hits(img, img_y, txt, txt_y, min(k, len(txt))).mean())
        out[f"t2i@{k}"] = float(hits(txt, txt_y, img, img_y, min(k, len(img))).mean())
    return out


@dataclasses.dataclass(frozen=True)
class LinearProbeResult:
    """Test accuracy of the probe refitted on the whole train set with the chosen ``C``, and the validation
    accuracy of every C tried (on the held-out slice of the train set)."""

    accuracy: float
    C: float
    val_accuracy: dict[float, float]


def _fit_probe(feats: np.ndarray, labels: np.ndarray, C: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)).fit(
        feats, labels
    )


def linear_probe_result(
    train_feats: Any,
    train_labels: Any,
    test_feats: Any,
    test_labels: Any,
    c_values: Sequence[float] = DEFAULT_PROBE_C,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
) -> LinearProbeResult:
    """Linear probe as in CLIP's paper: L-BFGS logistic regression on frozen, standardized features [N, D].

    ``C`` is chosen among ``c_values`` by accuracy on a held-out ``val_fraction`` of the train set (a seeded
    permutation; the smallest C wins ties, i.e. the strongest regularisation), then the probe is refitted on the
    whole train set and scored on the test set. Deterministic for fixed inputs."""
    train_feats = np.asarray(train_feats, dtype=np.float64)
    test_feats = np.asarray(test_feats, dtype=np.float64)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    c_values = sorted(float(c) for c in c_values)
    if not c_values:
        raise ValueError("c_values is empty: give at least one inverse regularisation strength")
    val_acc: dict[float, float] = {}
    if len(c_values) > 1:
        order = np.random.default_rng(seed).permutation(len(train_feats))
        n_val = max(1, int(round(val_fraction * len(order))))
        val, fit = order[:n_val], order[n_val:]
        if len(np.unique(train_labels[fit])) < 2:
            raise ValueError("the probe's fitting slice has a single class: give more training examples")
        for c in c_values:
            probe = _fit_probe(train_feats[fit], train_labels[fit], c, max_iter)
            val_acc[c] = float(probe.score(train_feats[val], train_labels[val]))
    best = max(c_values, key=lambda c: (val_acc.get(c, 0.0), -c))
    probe = _fit_probe(train_feats, train_labels, best, max_iter)
    return LinearProbeResult(float(probe.score(test_feats, test_labels)), best, val_acc)


def linear_probe(
    train_feats: Any,
    train_labels: Any,
    test_feats: Any,
    test_labels: Any,
    c_values: Sequence[float] = DEFAULT_PROBE_C,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
) -> float:
    """Test accuracy of ``linear_probe_result`` (see there)."""
    return linear_probe_result(
        train_feats, train_labels, test_feats, test_labels, c_values, val_fraction, max_iter, seed
    ).accuracy


def clip_score(image_emb: Any, text_emb: Any, w: float = 100.0) -> np.ndarray:
    """CLIPScore per pair, [N]: ``w * max(cos(image_i, text_i), 0)`` (Hessel et al. 2021, w = 2.5 there; w = 100
    as in torchmetrics, which most text-to-image papers report)."""
    img, txt = l2_normalize(image_emb), l2_normalize(text_emb)
    if img.shape != txt.shape:
        raise ValueError(f"clip_score needs paired embeddings of one shape, got {img.shape} and {txt.shape}")
    return (w * np.maximum((img * txt).sum(axis=-1), 0.0)).astype(np.float32)


def mean_clip_score(image_emb: Any, text_emb: Any, w: float = 100.0) -> float:
    """Mean of ``clip_score`` over the pairs.

    torchmetrics' CLIPScore clamps the mean cosine instead of each one (``max(mean(100 cos), 0)``); the two agree
    whenever no pair has a negative cosine, as with any trained CLIP on its own captions."""
    return float(np.mean(clip_score(image_emb, text_emb, w)))


def embed_in_batches(
    fn: Callable[[Any], Any], array: Any, batch_size: int, desc: str = "embedding", progress: bool = True
) -> np.ndarray:
    """``fn`` over ``array`` [N, ...] in batches of ``batch_size`` -> numpy [N, ...] (fn's output rows).

    The last partial batch is padded by repeating its final row, so a jitted ``fn`` compiles one shape; the padded
    rows' outputs are dropped. The next batch is dispatched before the previous result is copied to the host."""
    from tqdm.auto import tqdm

    array = np.asarray(array)
    n, batch_size = len(array), int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if n == 0:
        raise ValueError("embed_in_batches got an empty array")
    batches = math.ceil(n / batch_size)
    out, pending = [], None
    for b in tqdm(range(batches), desc=desc, disable=not progress or batches == 1):
        chunk = array[b * batch_size : (b + 1) * batch_size]
        valid = len(chunk)
        if valid < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
        result = fn(chunk)
        if pending is not None:
            out.append(np.asarray(pending[0])[: pending[1]])
        pending = (result, valid)
    out.append(np.asarray(pending[0])[: pending[1]])
    return np.concatenate(out)
