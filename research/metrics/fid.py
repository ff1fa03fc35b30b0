"""Distances between feature distributions: FID, KID and improved precision/recall, in float64 numpy.

Each metric takes features [N, D] from one network (FID Inception pool features, or a domain classifier's
penultimate layer; see research.metrics.classifier) and compares two sets of them:

* FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to the two sets,
  ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. ``frechet_distance`` follows pytorch-fid's
  algorithm step for step by default, so a number computed here equals pytorch-fid's from the same statistics.
* KID (Binkowski et al. 2018): the unbiased MMD^2 with the kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over
  random subsets. Unlike FID it has no bias that depends on the number of samples.
* Improved precision and recall (Kynkaanniemi et al. 2019): the fraction of generated samples inside the
  k-NN manifold of the real ones, and the reverse.

Statistics files (``save_statistics`` / ``load_statistics``) are .npz files with pytorch-fid's keys ``mu`` and
``sigma``, so either program reads the other's; ours add a JSON ``meta`` entry saying where the numbers came from.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
from scipy import linalg

__all__ = [
    "FRECHET_METHODS",
    "feature_statistics",
    "frechet_distance",
    "save_statistics",
    "load_statistics",
    "kid",
    "kid_subset_indices",
    "precision_recall",
    "knn_radii",
]

FRECHET_METHODS = ("sqrtm", "eigh")

# pytorch-fid's tolerance on the imaginary part of diag(sqrtm(S1 S2)); larger parts mean the product is far from
# having the real non-negative spectrum a product of two covariances must have.
_IMAG_ATOL = 1e-3


def _as_features(features: Any, name: str) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of features [N, D], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features, as pytorch-fid computes them.

    Args:
      features: [N, D] with N >= 2 (any real dtype; computed in float64).
    Returns:
      (mu [D], sigma [D, D]) float64; sigma is the unbiased sample covariance (``np.cov(rowvar=False)``).
    """
    x = _as_features(features, "features")
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {x.shape[0]}")
    return np.mean(x, axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _check_statistics(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    for name, mu, sigma in (("1", mu1, sigma1), ("2", mu2, sigma2)):
        if mu.ndim != 1:
            raise ValueError(f"mu{name} must be a vector [D], got shape {mu.shape}")
        if sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"sigma{name} must be [D, D] = [{mu.shape[0]}, {mu.shape[0]}] to match mu{name}, "
                f"got shape {sigma.shape}"
            )
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(
                f"mu{name} / sigma{name} contain NaN or infinite values (statistics of fewer than "
                "2 samples, or of non-finite features?)"
            )
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"the two sets of statistics have different feature dimensions: {mu1.shape[0]} vs "
            f"{mu2.shape[0]} (computed with different feature extractors?)"
        )
    return mu1, sigma1, mu2, sigma2


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr((S1 S2)^(1/2)) exactly as pytorch-fid's calculate_frechet_distance computes it."""
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"FID: sqrtm of the covariance product is not finite (singular product); adding {eps} to "
            "the diagonal of both covariances, as pytorch-fid does",
            RuntimeWarning,
            stacklevel=3,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=_IMAG_ATOL):
            raise ValueError(
                f"FID: sqrtm of the covariance product has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not valid (not symmetric "
                "positive semi-definite?)"
            )
        covmean = covmean.real
    return np.trace(covmean)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance [D, D], rounding-noise negative eigenvalues clipped to 0."""
    w, v = linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # S1 S2 is similar to S1^(1/2) S2 S1^(1/2), which is symmetric PSD: its eigenvalues are real and >= 0, so the
    # trace of the square root is a sum of real square roots, with no complex detour and no eps.
    root1 = _psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    return float(np.sum(np.sqrt(np.clip(linalg.eigvalsh((m + m.T) / 2), 0, None))))


def frechet_distance(
    mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6, *, method: str = "sqrtm"
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): the FID when the statistics are Inception's.

    Args:
      mu1, mu2: means [D].
      sigma1, sigma2: covariances [D, D].
      eps: with method 'sqrtm', what is added to both diagonals when sqrtm(S1 S2) is not finite.
      method: 'sqrtm' (default) is pytorch-fid's algorithm: scipy's sqrtm of the non-symmetric product S1 S2, the
        eps retry (with a RuntimeWarning) when that is not finite, and the imaginary part dropped when it is
        negligible (ValueError when not); numbers equal pytorch-fid's. 'eigh' computes tr((S1 S2)^(1/2)) from the
        eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2): real arithmetic throughout and no eps, so it stays
        accurate for singular covariances (fewer samples than dimensions, dead features), where 'sqrtm' can fail
        or pick up an eps-sized bias. Use it for new comparisons; keep 'sqrtm' to compare with published FIDs.
    Returns:
      The distance (a Python float, >= 0 up to rounding).
    """
    mu1, sigma1, mu2, sigma2 = _check_statistics(mu1, sigma1, mu2, sigma2)
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"unknown method {method!r}; use one of {FRECHET_METHODS}")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------- statistics files


def save_statistics(path: str, mu: Any, sigma: Any, **meta: Any) -> None:
    """Writes mu [D] and sigma [D, D] to the .npz file ``path`` (exactly that name), pytorch-fid compatible.

    ``meta`` (JSON-serialisable: number of samples, feature extractor, protocol, dataset, split, ...) is stored as
    a JSON string under the key 'meta', which pytorch-fid ignores. The file is written atomically.
    """
    mu, sigma, _, _ = _check_statistics(mu, sigma, mu, sigma)
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"statistics metadata must be JSON-serialisable: {e}") from e
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        # A file object, because np.savez given a name without '.npz' would append one.
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, meta=np.array(meta_json))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reads a statistics .npz written by ``save_statistics`` or by pytorch-fid.

    Returns:
      (mu [D] float64, sigma [D, D] float64, meta dict; empty for pytorch-fid files, which hold only mu/sigma).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"statistics file {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as e:  # what np.load raises for files that are not .npz archives
        raise ValueError(f"cannot read statistics file {path}: {e}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not a statistics .npz with 'mu' and 'sigma'")
    with archive as f:
        keys = set(f.keys())
        if not {"mu", "sigma"} <= keys:
            raise ValueError(
                f"{path} is not a statistics file: it needs arrays 'mu' and 'sigma', it has {sorted(keys)}"
            )
        mu, sigma = f["mu"], f["sigma"]
        meta = json.loads(str(f["meta"])) if "meta" in keys else {}
    mu, sigma, _, _ = _check_statistics(mu, sigma, mu, sigma)
    return mu, sigma, meta


# ----------------------------------------------------------------------------------------------- KID


def kid_subset_indices(
    num_a: int, num_b: int, num_subsets: int, subset_size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The random subsets ``kid`` averages over: (idx_a [S, m], idx_b [S, m]), each row drawn without replacement.

    ``m`` is ``subset_size`` clipped to ``min(num_a, num_b)``. A fixed seed makes KID a deterministic function of
    the two feature sets.
    """
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(int(subset_size), num_a, num_b)
    if m < 2:
        raise ValueError(
            f"KID needs subsets of at least 2 samples; got subset_size={subset_size} with {num_a} and {num_b} samples"
        )
    rng = np.random.default_rng(seed)
    idx_a = np.empty((num_subsets, m), np.int64)
    idx_b = np.empty((num_subsets, m), np.int64)
    for s in range(num_subsets):
        idx_a[s] = rng.choice(num_a, m, replace=False)
        idx_b[s] = rng.choice(num_b, m, replace=False)
    return idx_a, idx_b


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between x [m, D] and y [m, D] with k(a, b) = (a.b / D + 1)^3 (Binkowski et al.'s estimator:
    within-set sums without the diagonal over m(m-1), the cross sum over m^2)."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(
    features_a: Any, features_b: Any, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased polynomial-kernel MMD^2, mean and std over random subsets.

    Args:
      features_a: [N, D]; features_b: [M, D].
      num_subsets, subset_size, seed: the subsets, as ``kid_subset_indices`` draws them (subset_size is clipped to
        min(N, M)).
    Returns:
      (mean, std) over subsets (std with ddof=0). The mean can be slightly negative when the sets match.
    """
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    idx_a, idx_b = kid_subset_indices(len(a), len(b), num_subsets, subset_size, seed)
    values = np.array([_polynomial_mmd2(a[ia], b[ib]) for ia, ib in zip(idx_a, idx_b)])
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------------------------- precision/recall

# Squared distances below this fraction of |a|^2 + |b|^2 are rounding noise of the expansion
# |a|^2 + |b|^2 - 2 a.b; they are set to 0 so that exact duplicates get distance 0 however BLAS blocked the sum.
_DUPLICATE_RTOL = 1e-10


def _squared_distances(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] squared Euclidean distances, >= 0."""
    scale = a_sq[:, None] + b_sq[None, :]
    d = scale - 2 * (a @ b.T)
    d[d <= _DUPLICATE_RTOL * scale] = 0
    return d


def _check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def knn_radii(features: Any, k: int = 3, batch_size: int = 1000) -> np.ndarray:
    """Squared distance from each sample to its k-th nearest neighbour in the same set, itself excluded.

    Args:
      features: [N, D] with N > k.
      batch_size: rows of the [batch_size, N] distance matrix held at a time.
    Returns:
      squared radii [N] float64 (a duplicate of a sample counts as a neighbour at distance 0).
    """
    x = _as_features(features, "features")
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}] for {n} samples, got k={k}")
    batch_size = _check_batch_size(batch_size)
    sq = np.einsum("ij,ij->i", x, x)
    radii = np.empty(n)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        d = _squared_distances(x[start:stop], x, sq[start:stop], sq)
        rows = np.arange(stop - start)
        d[rows, start + rows] = np.inf  # the sample itself is not its own neighbour
        radii[start:stop] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return radii


def _mutual_coverage(
    real: np.ndarray, real_radii: np.ndarray, fake: np.ndarray, fake_radii: np.ndarray, batch_size: int
) -> tuple[float, float]:
    """(fraction of fake inside some real ball, fraction of real inside some fake ball) from one pass over the
    [M, N] fake-to-real distances, batch_size fake rows at a time."""
    real_sq = np.einsum("ij,ij->i", real, real)
    fake_sq = np.einsum("ij,ij->i", fake, fake)
    fake_inside = np.empty(len(fake), bool)
    real_inside = np.zeros(len(real), bool)
    for start in range(0, len(fake), batch_size):
        stop = min(start + batch_size, len(fake))
        d = _squared_distances(fake[start:stop], real, fake_sq[start:stop], real_sq)
        fake_inside[start:stop] = (d <= real_radii[None, :]).any(axis=1)
        real_inside |= (d <= fake_radii[start:stop, None]).any(axis=0)
    return float(fake_inside.mean()), float(real_inside.mean())


def precision_recall(real_features: Any, fake_features: Any, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    The manifold of a set is the union of balls around its samples, each reaching the sample's k-th nearest
    neighbour within the set. Precision is the fraction of fake samples inside the real manifold (fidelity);
    recall the fraction of real samples inside the fake manifold (coverage). A point on a ball's boundary counts
    as inside. Distances are computed batch_size rows at a time (10k x 10k sets: ~80 MB per batch) in three
    passes: real-real, fake-fake, and fake-real shared by both coverages.

    Args:
      real_features: [N, D]; fake_features: [M, D]; both with more than k samples.
    Returns:
      (precision, recall), each in [0, 1].
    """
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    batch_size = _check_batch_size(batch_size)
    real_radii = knn_radii(real, k, batch_size)
    fake_radii = knn_radii(fake, k, batch_size)
    return _mutual_coverage(real, real_radii, fake, fake_radii, batch_size)
