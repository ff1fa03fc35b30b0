"""Controllability of a ControlNet: how well the edges of generated images follow the edge-map hints.

edge_f1(pred, ref, tolerance) compares two binary edge maps per image the way edge-detection benchmarks do
(BSDS-style matching, simplified to a distance tolerance): a predicted edge pixel is correct when a reference
edge pixel lies within `tolerance` pixels of it (Chebyshev distance), a reference pixel is recovered when a
predicted one lies within the tolerance;

    precision = correct predicted / predicted,  recall = recovered reference / reference,
    F1 = 2 P R / (P + R)   (0 when both are 0; an image with no edges in either map scores 1).

IoU of the dilated maps is given too. Inputs are numpy arrays [N, H, W] or [N, H, W, 1] of {0, 1}.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _binary(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 4:
        if x.shape[-1] != 1:
            raise ValueError(f"edge maps must have one channel; got shape {x.shape}")
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"edge maps must be [N, H, W] or [N, H, W, 1]; got shape {x.shape}")
    return x > 0.5


def dilate(edges: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation [N, H, W] by a (2 radius + 1)^2 square (zero outside the image)."""
    if radius <= 0:
        return edges.copy()
    n, h, w = edges.shape
    padded = np.pad(edges, ((0, 0), (radius, radius), (radius, radius)))
    out = np.zeros_like(edges)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[:, dy : dy + h, dx : dx + w]
    return out


@dataclasses.dataclass(frozen=True)
class EdgeScores:
    """Per-image precision, recall, F1 and IoU [N], and their means."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    iou: np.ndarray

    def means(self) -> dict:
        return {k: float(np.mean(getattr(self, k))) for k in ("precision", "recall", "f1", "iou")}


def edge_scores(pred: np.ndarray, ref: np.ndarray, tolerance: int = 1) -> EdgeScores:
    pred, ref = _binary(pred), _binary(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"edge maps of different shapes: {pred.shape} vs {ref.shape}")
    near_ref, near_pred = dilate(ref, tolerance), dilate(pred, tolerance)
    n_pred, n_ref = pred.sum((1, 2)), ref.sum((1, 2))
    correct, recovered = (pred & near_ref).sum((1, 2)), (ref & near_pred).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_pred > 0, correct / np.maximum(n_pred, 1), 1.0 * (n_ref == 0))
        recall = np.where(n_ref > 0, recovered / np.maximum(n_ref, 1), 1.0 * (n_pred == 0))
        total = precision + recall
        f1 = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)
        union = (near_pred | near_ref).sum((1, 2))
        iou = np.where(union > 0, (near_pred & near_ref).sum((1, 2)) / np.maximum(union, 1), 1.0)
    return EdgeScores(precision.astype(np.float64), recall.astype(np.float64), f1.astype(np.float64), iou)


def edge_f1(pred: np.ndarray, ref: np.ndarray, tolerance: int = 1) -> float:
    """Mean per-image F1 of predicted edge maps against reference ones (see the module docstring)."""
    return edge_scores(pred, ref, tolerance).means()["f1"]
