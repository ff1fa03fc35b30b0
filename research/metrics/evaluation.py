"""Sample-quality evaluation: feature spaces, image sources, cached reference features, and one result dict.

A *feature space* turns uint8 images [N, H, W, C] into features [N, D]:
  inception   the FID Inception-v3 (pool features, 2048-d) under a named preprocessing protocol
  domain      a small classifier trained on the dataset itself (penultimate features), for 8x8 and 28x28 sets
              where Inception at 299x299 is slow on a CPU; its softmax also gives a classifier score
Every number carries the description of its space (network, preprocessing, sample count, reference).

An *image source* is a path (an .npz holding `images` uint8 [N, H, W, C] as research.sample writes, or `arr_0`
as reference batches often do; or a folder of PNG/JPEG files) or a dataset spec `name:split[:num]`
(e.g. `mnist:train`, `fashion_mnist:test:10000`, `digits:train`). A statistics file (.npz with `mu` and
`sigma`, as pytorch-fid and `python -m research.evaluate stats` write) stands in for a source where only the
FID is asked for.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from research.metrics.cache import cache_dir

FEATURE_SPACES = ("inception", "domain")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class EvaluationError(ValueError):
    """A user-caused problem with an evaluation request (bad path, spec, shape or metric)."""


def _user_errors():
    from research.metrics.classifier import ClassifierError
    from research.metrics.inception import InceptionWeightsChecksumError, InceptionWeightsNotFound

    return (EvaluationError, ClassifierError, InceptionWeightsNotFound, InceptionWeightsChecksumError)


def __getattr__(name):
    # USER_ERRORS imports the metric modules (and so jax) only when a command asks for it.
    if name == "USER_ERRORS":
        return _user_errors()
    raise AttributeError(name)


# ----------------------------------------------------------------------------------------------- image sources


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    split: str
    num: Optional[int] = None

    def __str__(self):
        return f"{self.name}:{self.split}" + (f":{self.num}" if self.num else "")


def parse_dataset_spec(text: str) -> Optional[DatasetSpec]:
    """'mnist:train' / 'mnist:test:1000' -> DatasetSpec; anything that exists as a path -> None."""
    if os.path.exists(text) or ":" not in text:
        return None
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise EvaluationError(f"{text!r} is neither an existing path nor a dataset spec name:split[:num]")
    num = None
    if len(parts) == 3:
        if not parts[2].isdigit() or int(parts[2]) <= 0:
            raise EvaluationError(f"{text!r}: the number of images must be a positive integer")
        num = int(parts[2])
    return DatasetSpec(parts[0], parts[1], num)


def _split_source(spec: DatasetSpec, data_dir: Optional[str] = None):
    from research.data.sources import get_source

    # The data layer raises DataError naming the fix when files are missing or the name / split is unknown.
    source = get_source({"name": spec.name, "data_dir": data_dir or ""}, spec.split, check_shape=False)
    if spec.num is not None and spec.num > len(source):
        raise EvaluationError(f"{spec} asks for {spec.num} images but the split has {len(source)}")
    return source


def split_size(spec: DatasetSpec, data_dir: Optional[str] = None) -> int:
    """Images in the split (without reading pixels); DataError / EvaluationError for an unusable spec."""
    return len(_split_source(spec, data_dir))


def dataset_images(spec: DatasetSpec, data_dir: Optional[str] = None):
    """-> (uint8 images [N, H, W, C], int32 labels [N]) of a dataset split, through the project's data sources."""
    from research.data import read_examples

    source = _split_source(spec, data_dir)
    images, labels = read_examples(source, np.arange(spec.num or len(source)))
    return np.array(images, np.uint8), np.array(labels, np.int32)


def _npz_problem(path: str) -> Optional[str]:
    """Why `path` cannot be an .npz archive (None if it starts like a zip file)."""
    with open(path, "rb") as f:
        head = f.read(4)
    # An .npz is a zip archive: local file header PK\x03\x04, or PK\x05\x06 when empty.
    return None if head in (b"PK\x03\x04", b"PK\x05\x06") else "it is not a zip archive"


def load_images(path: str) -> np.ndarray:
    """uint8 [N, H, W, C] from an .npz of images or a folder of image files (sorted by name)."""
    if os.path.isdir(path):
        from PIL import Image, UnidentifiedImageError

        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise EvaluationError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        images = []
        for n in names:
            try:
                with Image.open(os.path.join(path, n)) as im:
                    arr = np.asarray(
                        im.convert("L") if im.mode in ("L", "LA", "P", "1", "I", "I;16") else im.convert("RGB")
                    )
            except (UnidentifiedImageError, OSError) as e:
                raise EvaluationError(f"{os.path.join(path, n)} is not a readable image ({e})") from None
            images.append(arr[..., None] if arr.ndim == 2 else arr)
        shapes = {a.shape for a in images}
        if len(shapes) > 1:
            raise EvaluationError(f"images in {path} differ in shape: {sorted(shapes)[:4]}")
        return np.stack(images)
    if not os.path.isfile(path):
        raise EvaluationError(f"{path} does not exist")
    if not path.endswith(".npz"):
        raise EvaluationError(f"{path}: expected an .npz file or a folder of images")
    what = f"{path} is not an .npz of uint8 images [N,H,W,C]"
    problem = _npz_problem(path)
    if problem:
        raise EvaluationError(f"{what} ({problem})")
    try:
        # Never unpickle: an .npz from elsewhere could run code on load.
        with np.load(path, allow_pickle=False) as f:
            key = "images" if "images" in f else "arr_0" if "arr_0" in f else None
            if key is None:
                if "mu" in f and "sigma" in f:
                    raise EvaluationError(f"{path} holds statistics (mu, sigma), not images: only FID can use it")
                raise EvaluationError(f"{path} has no 'images' (or 'arr_0') array; it has {list(f.keys())}")
            images = f[key]
    except EvaluationError:
        raise
    except ValueError as e:
        if "bject array" in str(e) or "pickle" in str(e):
            raise EvaluationError(f"{what} (it holds object arrays)") from None
        raise EvaluationError(f"{what} ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise EvaluationError(f"{what} (it is a damaged archive: {e})") from None
    return check_images(images, path)


def check_images(images: np.ndarray, where: str = "images", announce: Callable[[str], None] = print) -> np.ndarray:
    """uint8 images [N, H, W, C] (a trailing C=1 is added to [N, H, W]).

    Integer images in 0..255 are cast. Float images are converted when their range says which convention they
    follow, and `announce` is told so in one line: [0, 1] -> round(255 x); [-1, 1] (some value < 0) ->
    round(127.5 (x + 1)); whole numbers in [0, 255] -> cast. Anything else (NaN, other ranges, fractional values
    above 1) is refused: guessing would silently change every score.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise EvaluationError(f"{where}: expected images [N, H, W, C] with C in (1, 3), got shape {images.shape}")
    if len(images) == 0:
        raise EvaluationError(f"{where} holds no images (shape {images.shape})")
    if images.dtype == np.uint8:
        return images
    hint = "(save uint8 pixels, e.g. with research.sampling.to_uint8)"
    if images.dtype == np.bool_ or not (
        np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
    ):
        raise EvaluationError(f"{where}: expected uint8 pixels 0..255, got dtype {images.dtype} {hint}")
    if np.issubdtype(images.dtype, np.floating) and not np.all(np.isfinite(images)):
        raise EvaluationError(f"{where}: {images.dtype} images hold NaN or infinite values {hint}")
    lo, hi = float(images.min()), float(images.max())
    whole = np.issubdtype(images.dtype, np.integer) or bool(np.all(images == np.round(images)))
    if np.issubdtype(images.dtype, np.floating) and 0.0 <= lo and hi <= 1.0:
        announce(f"note: {where} holds {images.dtype} images in [0, 1]; converted to uint8 as round(255 x)")
        return np.round(images.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(images.dtype, np.floating) and -1.0 <= lo < 0.0 and hi <= 1.0:
        announce(f"note: {where} holds {images.dtype} images in [-1, 1]; converted to uint8 as round(127.5 (x + 1))")
        return np.round((images.astype(np.float64) + 1.0) * 127.5).astype(np.uint8)
    if whole and 0.0 <= lo and hi <= 255.0:
        if np.issubdtype(images.dtype, np.floating):
            announce(f"note: {where} holds {images.dtype} whole numbers in [0, 255]; read as uint8 pixels")
        return images.astype(np.uint8)
    raise EvaluationError(
        f"{where}: expected uint8 pixels 0..255, got {images.dtype} in [{lo:g}, {hi:g}]; "
        f"floats are read only in [0, 1], [-1, 1] or as whole numbers 0..255 {hint}"
    )


def is_statistics_file(path: str) -> bool:
    if not (os.path.isfile(path) and path.endswith(".npz")) or _npz_problem(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as f:
            return "mu" in f and "sigma" in f and "images" not in f and "arr_0" not in f
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return False  # load_images says what is wrong with it


# ----------------------------------------------------------------------------------------------- feature spaces


@dataclass
class FeatureSpace:
    """A named map uint8 images [N, H, W, C] -> float features [N, D] (+ class probabilities for domain)."""

    kind: str
    name: str  # identifies network + weights + preprocessing: part of every cache key
    description: str
    features: Callable[..., np.ndarray]
    # (features, class probabilities) in one pass, for spaces whose network also classifies (domain).
    features_and_probs: Optional[Callable[..., tuple]] = None
    extra: dict = field(default_factory=dict)


def feature_space(
    kind: str,
    dataset: Optional[str] = None,
    *,
    protocol: str = "pytorch-fid",
    batch_size: Optional[int] = None,
    data_dir: Optional[str] = None,
) -> FeatureSpace:
    if kind == "inception":
        from research.metrics import inception

        kwargs = {} if batch_size is None else {"batch_size": batch_size}
        net = inception.InceptionFeatures(protocol=protocol, **kwargs)
        return FeatureSpace(
            "inception",
            f"inception-{net.weights_tag}-{protocol}",
            f"FID Inception-v3 pool features (2048-d), {inception.protocol_description(protocol)}",
            net,
        )
    if kind == "domain":
        if not dataset:
            raise EvaluationError(
                "the domain feature space needs a dataset (e.g. --domain mnist): its classifier "
                "is trained on that dataset"
            )
        from research.metrics import classifier

        clf = classifier.get_domain_classifier(dataset, data_dir=data_dir)
        return FeatureSpace(
            "domain",
            f"domain-{clf.name}-{clf.checksum[:12]}",
            f"{clf.name} classifier penultimate features (test accuracy "
            f"{clf.test_accuracy:.2%}, sha256 {clf.checksum[:12]})",
            clf.features,
            clf.features_and_probs,
            {"test_accuracy": clf.test_accuracy},
        )
    raise EvaluationError(f"unknown feature space {kind!r}: use one of {FEATURE_SPACES}")


def reference_features(
    space: FeatureSpace, spec: DatasetSpec, *, data_dir: Optional[str] = None, progress: bool = True
) -> np.ndarray:
    """Features [N, D] (float32) of a dataset split, computed once per (space, split, num) and cached."""
    path = os.path.join(cache_dir("reference"), f"{space.name}__{spec.name}_{spec.split}_{spec.num or 'all'}.npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            return f["features"]
    images, _ = dataset_images(spec, data_dir)
    feats = np.asarray(space.features(images, progress=progress), np.float32)
    tmp = path + ".tmp.npz"
    np.savez(tmp, features=feats, meta=json.dumps({"space": space.description, "source": str(spec), "num": len(feats)}))
    os.replace(tmp, path)
    return feats


def source_features(space: FeatureSpace, source: str, *, data_dir: Optional[str] = None, progress: bool = True):
    """-> (features [N, D], images or None, description) for a path or dataset spec."""
    spec = parse_dataset_spec(source)
    if spec is not None:
        return reference_features(space, spec, data_dir=data_dir, progress=progress), None, str(spec)
    images = load_images(source)
    return np.asarray(space.features(images, progress=progress)), images, f"{source} ({len(images)} images)"


# ----------------------------------------------------------------------------------------------- the metrics


def check_sample_counts(
    num_a: int,
    num_b: int,
    *,
    kid: bool = False,
    precision_recall: bool = False,
    pr_k: int = 3,
    kid_subset_size: Optional[int] = None,
) -> None:
    """EvaluationError unless two sets of num_a and num_b images support the asked metrics: FID needs 2 per set
    (a covariance), KID subsets of kid_subset_size (when given) or at least 2, precision/recall k + 1."""
    small = min(num_a, num_b)
    if small < 2:
        raise EvaluationError(f"FID needs at least 2 images per set (a covariance); got {num_a} and {num_b}")
    if kid and kid_subset_size is not None and kid_subset_size > small:
        raise EvaluationError(
            f"KID subsets of {kid_subset_size} images need that many in each set; got {num_a} and "
            f"{num_b} (lower --kid-subset-size to at most {small})"
        )
    if precision_recall and small <= pr_k:
        raise EvaluationError(
            f"precision/recall (k={pr_k}) needs more than {pr_k} images per set; got {num_a} and {num_b}"
        )


def compare_features(
    fake: np.ndarray,
    real: np.ndarray,
    *,
    kid: bool = True,
    precision_recall: bool = True,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
) -> dict:
    """FID (+ KID, improved precision/recall) between two feature sets [N, D] and [M, D]."""
    from research.metrics import fid as fid_lib

    check_sample_counts(len(fake), len(real), kid=kid, precision_recall=precision_recall, pr_k=pr_k)
    mu1, s1 = fid_lib.feature_statistics(fake)
    mu2, s2 = fid_lib.feature_statistics(real)
    out = {"fid": float(fid_lib.frechet_distance(mu1, s1, mu2, s2)), "num_fake": len(fake), "num_real": len(real)}
    if kid:
        mean, std = fid_lib.kid(fake, real, subset_size=kid_subset_size)
        # Subsets are clipped to the smaller set; the size used is part of the protocol.
        out.update(kid=float(mean), kid_std=float(std), kid_subset_size=min(kid_subset_size, len(fake), len(real)))
    if precision_recall:
        p, r = fid_lib.precision_recall(real, fake, k=pr_k)
        out.update(precision=float(p), recall=float(r))
    return out


def evaluate_images(
    images: np.ndarray,
    space: FeatureSpace,
    reference: DatasetSpec,
    *,
    labels=None,
    data_dir: Optional[str] = None,
    kid: bool = True,
    precision_recall: bool = True,
    progress: bool = True,
) -> dict:
    """All metrics of generated uint8 images against a dataset split in one feature space."""
    images = check_images(images)
    real = reference_features(space, reference, data_dir=data_dir, progress=progress)
    probs = None
    if space.features_and_probs is not None:
        fake, probs = space.features_and_probs(images, progress=progress)
    else:
        fake = space.features(images, progress=progress)
    out = compare_features(np.asarray(fake), real, kid=kid, precision_recall=precision_recall)
    if probs is not None:
        from research.metrics import classifier

        out["classifier_score"] = float(classifier.classifier_score(probs))
        if labels is not None and len(labels) == len(images) and np.min(labels) >= 0:
            out["classifier_accuracy"] = float(classifier.classifier_accuracy(probs, labels))
    out.update(space=space.name, protocol=space.description, reference=str(reference))
    return out
