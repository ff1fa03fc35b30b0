"""Random-access image data sources.

Every source has ``len()`` and ``__getitem__(i)`` returning a dict of fields,
at least ``{'image': np.uint8 [H, W, C], 'label': np.int32 scalar}``, plus any
other per-example field the source provides (e.g. ``'caption'``: a ``str``,
``'hint'``: a uint8 [H, W, C] conditioning image), and

* ``image_shape``: ``(H, W, C)``, computed without loading the pixel data, so
  configs can be validated before anything expensive happens;
* ``num_classes``: number of label values, or ``None`` when unknown.

Image-caption sources (text-to-image and CLIP training) add ``'caption'``: ``ImageFolderSource`` (a folder with a
Hugging Face imagefolder ``metadata.jsonl``) and ``TfdsSource`` with a ``caption_key``.

A source may also implement ``read_fields(indices)`` returning the same fields
for a whole batch (every value with leading dimension ``len(indices)``), so a
batch is built without N Python-level record reads. Sources whose whole split
fits in memory expose ``as_array()`` returning ``(images uint8 [N, H, W, C],
labels int32 [N])`` too. ``read_fields(source, indices)`` in this module reads
a batch from any source kind; see it for how fields are stacked and typed.

Constructors only check that the files exist (cheap); pixel data is read on
first access and cached on the instance.
"""

from __future__ import annotations

import abc
import gzip
import os
import pickle
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "DataError",
    "DigitsSource",
    "IDXSource",
    "MnistFashionSource",
    "Cifar10Source",
    "TfdsSource",
    "ImageFolderSource",
    "SyntheticSource",
    "SOURCE_NAMES",
    "DATA_DIR_ENV",
    "get_source",
    "read_fields",
]

DATA_DIR_ENV = "RESEARCH_DATA_DIR"
SOURCE_NAMES = ("digits", "mnist", "fashion_mnist", "mnist_fashion", "cifar10", "tfds", "imagefolder", "synthetic")


class DataError(ValueError):
    """A data set cannot be used as configured; the message says what to change."""


def _field(config: Any, key: str, default: Any = None) -> Any:
    """Reads an optional field from a ConfigDict, a dict or a plain object."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    getter = getattr(config, "get", None)
    if callable(getter):
        return getter(key, default)
    return getattr(config, key, default)


def _check_index(index: Any, length: int) -> int:
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
        raise TypeError(f"index must be an integer, got {type(index).__name__}")
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a source of length {length}")
    return index


class _ArraySource(abc.ABC):
    """Base for sources that hold a whole split in memory once loaded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    @abc.abstractmethod
    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        """Read the whole split: (images uint8 [N, H, W, C], labels int32 [N])."""

    def as_array(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns read-only ``(images uint8 [N,H,W,C], labels int32 [N])``."""
        if self._images is None:
            # The lock keeps a multi-threaded reader from parsing the files twice.
            with self._lock:
                if self._images is None:
                    images, labels = self._load()
                    images = np.ascontiguousarray(images, dtype=np.uint8)
                    labels = np.ascontiguousarray(labels, dtype=np.int32)
                    if images.ndim != 4 or labels.shape != (images.shape[0],):
                        raise DataError(
                            f"{self!r}: loaded images {images.shape} and labels "
                            f"{labels.shape} do not form [N,H,W,C] / [N]"
                        )
                    # Records are views into the cache; read-only stops a caller
                    # from silently corrupting every later read.
                    images.flags.writeable = False
                    labels.flags.writeable = False
                    self._labels = labels
                    self._images = images
        return self._images, self._labels

    def __len__(self) -> int:
        return len(self.as_array()[1])

    def read_fields(self, indices: Any) -> dict[str, np.ndarray]:
        """``{'image': uint8 [B, H, W, C], 'label': int32 [B]}`` at ``indices`` (copies, not views)."""
        images, labels = self.as_array()
        indices = np.asarray(indices, dtype=np.int64)
        return {"image": images[indices], "label": labels[indices]}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        images, labels = self.as_array()
        index = _check_index(index, len(labels))
        return {"image": images[index], "label": labels[index]}


# --------------------------------------------------------------------------- digits


class DigitsSource(_ArraySource):
    """scikit-learn's 8x8 handwritten digits (1,797 images, bundled with sklearn).

    Needs no files, so it is the default data set for smoke tests and CPU runs.
    Pixel values 0..16 are mapped to uint8 by ``round(v * 255 / 16)``.
    Splits: 'train' (first 1,500), 'test' (fixed last 297), 'all'.
    """

    NUM_TEST = 297
    SPLITS = ("train", "test", "all")
    image_shape = (8, 8, 1)
    num_classes = 10

    def __init__(self, split: str = "train") -> None:
        super().__init__()
        if split not in self.SPLITS:
            raise DataError(f"digits has no split {split!r}; valid splits: {self.SPLITS}")
        self.split = split

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int32)
        cut = len(labels) - self.NUM_TEST
        if self.split == "train":
            return images[:cut], labels[:cut]
        if self.split == "test":
            return images[cut:], labels[cut:]
        return images, labels

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r})"


# --------------------------------------------------------------------------- IDX

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _open_maybe_gzip(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _parse_idx_header(raw: bytes, path: str, expected_magic: int) -> tuple[int, ...]:
    """Validates the magic number at the start of ``raw`` and returns the stored dimensions."""
    ndim = expected_magic & 0xFF  # the low byte of an IDX magic number is the rank
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"IDX file {path} is truncated ({len(raw)}-byte header)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"IDX file {path} has magic number {magic}, expected {expected_magic} "
            "(corrupt file, or images and labels files swapped?)"
        )
    return tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def _read_idx_bytes(path: str, size: int = -1) -> bytes:
    try:
        with _open_maybe_gzip(path) as f:
            return f.read(size)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e


def _read_idx_header(path: str, expected_magic: int) -> tuple[int, ...]:
    header_size = 4 + 4 * (expected_magic & 0xFF)
    return _parse_idx_header(_read_idx_bytes(path, header_size), path, expected_magic)


def _read_idx(path: str, expected_magic: int) -> np.ndarray:
    raw = _read_idx_bytes(path)
    dims = _parse_idx_header(raw, path, expected_magic)
    header_size = 4 + 4 * len(dims)
    expected = header_size + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(
            f"IDX file {path} holds {len(raw)} bytes but its header {dims} implies "
            f"{expected}; the file is corrupt or truncated"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


class IDXSource(_ArraySource):
    """MNIST / Fashion-MNIST in the original IDX format (``.gz`` or uncompressed).

    ``directory`` holds ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (or the same
    names without ``.gz``). Images come back as [28, 28, 1].
    """

    SPLITS = ("train", "test")
    num_classes = 10

    def __init__(self, directory: str, split: str = "train", *, dataset_name: str = "MNIST") -> None:
        super().__init__()
        if split not in self.SPLITS:
            raise DataError(f"{dataset_name} has no split {split!r}; valid splits: {self.SPLITS}")
        self.directory = os.fspath(directory)
        self.split = split
        self.dataset_name = dataset_name
        prefix = _IDX_PREFIX[split]
        self.images_path = self._find(f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte")
        self.labels_path = self._find(f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte")
        self._image_shape: tuple[int, int, int] | None = None

    def _find(self, *stems: str) -> str:
        candidates = [s + ext for s in stems for ext in (".gz", "")]
        if not os.path.isdir(self.directory):
            raise DataError(
                f"{self.dataset_name} directory {self.directory} does not exist "
                f"(expected it to contain {candidates[0]})"
            )
        for name in candidates:
            path = os.path.join(self.directory, name)
            if os.path.isfile(path):
                return path
        prefix = _IDX_PREFIX[self.split]
        expected = ", ".join(f"{prefix}-{kind}.gz" for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
        raise DataError(
            f"{self.dataset_name} files not found in {self.directory}: expected {expected} "
            f"(or the same names without .gz) for split {self.split!r}"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self._image_shape is None:
            if self._images is not None:
                self._image_shape = tuple(self._images.shape[1:])
            else:
                _, h, w = _read_idx_header(self.images_path, _IDX_IMAGES_MAGIC)
                self._image_shape = (h, w, 1)
        return self._image_shape

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        images = _read_idx(self.images_path, _IDX_IMAGES_MAGIC)
        labels = _read_idx(self.labels_path, _IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(
                f"{self.images_path} has {len(images)} images but {self.labels_path} has {len(labels)} labels"
            )
        return images[..., None], labels

    def __repr__(self) -> str:
        return f"IDXSource({self.directory!r}, split={self.split!r})"


class MnistFashionSource(_ArraySource):
    """MNIST and Fashion-MNIST in one split: labels 0-9 are MNIST's digits, 10-19 Fashion-MNIST's classes (the
    text-to-image demo, whose prompts name both the data set and the class). Examples interleave by index (even:
    MNIST, odd: Fashion-MNIST, the longer set's remainder at the end), so the first N of a split hold both."""

    SPLITS = IDXSource.SPLITS
    num_classes = 20

    def __init__(self, mnist_dir: str, fashion_dir: str, split: str = "train") -> None:
        super().__init__()
        self.split = split
        self._parts = (
            IDXSource(mnist_dir, split, dataset_name="MNIST"),
            IDXSource(fashion_dir, split, dataset_name="Fashion-MNIST"),
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._parts[0].image_shape

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        (xm, ym), (xf, yf) = (part.as_array() for part in self._parts)
        n = min(len(ym), len(yf))
        images = np.concatenate([np.stack([xm[:n], xf[:n]], 1).reshape(2 * n, *xm.shape[1:]), xm[n:], xf[n:]])
        labels = np.concatenate([np.stack([ym[:n], yf[:n] + 10], 1).reshape(-1), ym[n:], yf[n:] + 10])
        return images, labels

    def __repr__(self) -> str:
        return f"MnistFashionSource(split={self.split!r})"


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    CIFAR batches are pickles; a plain ``pickle.load`` would run any code a
    tampered file names, while the real batches only reference numpy's array
    reconstruction helpers.
    """

    _ALLOWED_MODULES = (
        "numpy",
        "numpy.core.multiarray",
        "numpy._core.multiarray",
        "numpy.core.numeric",
        "numpy._core.numeric",
    )

    def find_class(self, module: str, name: str) -> Any:
        if module in self._ALLOWED_MODULES:
            return super().find_class(module, name)
        # Protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(...).
        if (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _load_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"CIFAR-10 batch {path} is not a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 batch {path}: b'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
    if labels.shape != (data.shape[0],):
        raise DataError(f"CIFAR-10 batch {path}: {data.shape[0]} images but {labels.shape} labels")
    # Rows are stored channel-major (1024 red, 1024 green, 1024 blue).
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


class Cifar10Source(_ArraySource):
    """CIFAR-10 "python version" batches, images [32, 32, 3].

    ``directory`` is either ``cifar-10-batches-py`` itself or the folder holding it.
    """

    SPLITS = ("train", "test")
    image_shape = (32, 32, 3)
    num_classes = 10

    def __init__(self, directory: str, split: str = "train") -> None:
        super().__init__()
        if split not in self.SPLITS:
            raise DataError(f"cifar10 has no split {split!r}; valid splits: {self.SPLITS}")
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise DataError(f"CIFAR-10 directory {directory} does not exist")
        nested = os.path.join(directory, _CIFAR_FOLDER)
        self.directory = nested if os.path.isdir(nested) else directory
        self.split = split
        self.paths = [os.path.join(self.directory, n) for n in _CIFAR_FILES[split]]
        missing = [os.path.basename(p) for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise DataError(
                f"CIFAR-10 files not found in {self.directory}: missing {', '.join(missing)} "
                f"(expected the extracted {_CIFAR_FOLDER} folder of cifar-10-python.tar.gz)"
            )

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [_load_cifar_batch(p) for p in self.paths]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def __repr__(self) -> str:
        return f"Cifar10Source({self.directory!r}, split={self.split!r})"


# --------------------------------------------------------------------------- TFDS


class TfdsSource:
    """A TFDS data set opened with ``tfds.data_source`` (array_record; no TensorFlow).

    The data set must already be prepared in ``array_record`` format under
    ``data_dir``; nothing is downloaded unless ``download=True``, because
    preparing most TFDS data sets needs TensorFlow and network access.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        *,
        download: bool = False,
        image_key: str = "image",
        label_key: str | None = "label",
        caption_key: str | None = None,
    ) -> None:
        import tensorflow_datasets as tfds

        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key or None
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
        except Exception as e:  # tfds raises many unrelated types for "not available".
            where = data_dir or "the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
            raise DataError(
                f"cannot open TFDS data set {name!r} split {split!r} from {where}: "
                f"{type(e).__name__}: {e}. Prepare it in array_record format "
                f"(e.g. `tfds build {name} --file_format=array_record`) or set data.data_dir."
            ) from e
        features = self._source.dataset_info.features
        keys = list(features.keys())
        if image_key not in keys:
            raise DataError(f"TFDS data set {name!r} has no {image_key!r} feature (features: {keys})")
        if label_key is not None and label_key not in keys:
            raise DataError(
                f"TFDS data set {name!r} has no {label_key!r} feature (features: {keys}); "
                "pass label_key=None to use label 0 for every example"
            )
        if self.caption_key is not None:
            _feature_at(features, self.caption_key, f"TFDS data set {name!r}")
        shape = tuple(features[image_key].shape)
        if len(shape) == 2:
            shape = shape + (1,)
        self._declared_shape = shape
        self.num_classes = None
        if label_key is not None:
            self.num_classes = getattr(features[label_key], "num_classes", None)

    @property
    def image_shape(self) -> tuple:
        """Declared ``(H, W, C)``; entries are ``None`` for variable-size data sets."""
        return self._declared_shape

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = _check_index(index, len(self._source))
        record = self._source[index]
        image = np.asarray(record[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        if image.dtype != np.uint8 or image.ndim != 3:
            raise DataError(
                f"TFDS {self.name!r} image has dtype {image.dtype} and shape {image.shape}; "
                "expected uint8 [H, W] or [H, W, C]"
            )
        label = 0 if self.label_key is None else record[self.label_key]
        out = {"image": image, "label": np.int32(label)}
        if self.caption_key is not None:
            out["caption"] = _first_text(_feature_at(record, self.caption_key, f"{self!r} record {index}"))
        return out

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})"


def _feature_at(tree: Any, path: str, where: str) -> Any:
    """tree[a][b] for path 'a/b' (nested TFDS features such as coco_captions' 'captions/text')."""
    node = tree
    for part in path.split("/"):
        try:
            node = node[part]
        except (KeyError, TypeError, IndexError):
            keys = list(node.keys()) if hasattr(node, "keys") else type(node).__name__
            raise DataError(f"{where} has no caption feature {path!r} (no {part!r} among {keys})") from None
    return node


def _first_text(value: Any) -> str:
    """A caption from a text feature: bytes are decoded as UTF-8; of a sequence of captions (COCO has five per
    image) the first is used, so an example's caption is the same at every read (exact resume)."""
    if isinstance(value, np.ndarray) and value.ndim > 0 or isinstance(value, (list, tuple)):
        if not len(value):
            return ""
        value = value[0]
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return str(value)


# --------------------------------------------------------------------------- imagefolder with captions


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageFolderSource:
    """Images with captions in a folder laid out as Hugging Face's ``imagefolder`` expects: a ``metadata.jsonl``
    whose lines are ``{"file_name": "<path relative to the metadata file>", "text": "<caption>", ...}``.

    ``directory/<split>/metadata.jsonl`` is the split's folder; for ``split='train'`` a ``metadata.jsonl`` directly
    in ``directory`` also works. ``caption_key`` names the caption column (default ``text``); an integer ``label``
    column, when present, becomes the label (else 0). Each image is read with Pillow on access, converted to
    ``channels`` (1: grayscale, 3: RGB), its shorter side resized to ``image_size`` (bicubic, antialiased) and
    centre-cropped to ``image_size`` x ``image_size``, as text-to-image fine-tuning scripts prepare their data.
    Records: ``{'image': uint8 [S, S, C], 'label': int32, 'caption': str}``.
    """

    def __init__(
        self, directory: str, split: str = "train", *, image_size: int, channels: int, caption_key: str = "text"
    ) -> None:
        import json

        self.directory, self.split = directory, split
        self.image_size, self.channels, self.caption_key = int(image_size), int(channels), caption_key or "text"
        if self.channels not in (1, 3):
            raise DataError(f"imagefolder images are read as grayscale (1) or RGB (3), not {channels} channels")
        root = os.path.join(directory, split)
        if not os.path.isfile(os.path.join(root, "metadata.jsonl")) and split == "train":
            root = directory
        meta = os.path.join(root, "metadata.jsonl")
        if not os.path.isfile(meta):
            raise DataError(
                f"no metadata.jsonl for split {split!r} in {directory!r} (looked for {os.path.join(directory, split)}"
                f"/metadata.jsonl{' and ' + os.path.join(directory, 'metadata.jsonl') if split == 'train' else ''}); "
                'write one line per image: {"file_name": "0001.png", "text": "a caption"}'
            )
        self.root = root
        files, texts, labels = [], [], []
        with open(meta, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{meta} line {number} is not JSON: {e}") from None
                for key in ("file_name", self.caption_key):
                    if not isinstance(row.get(key), str):
                        raise DataError(
                            f"{meta} line {number} has no text field {key!r} (fields: {sorted(row)}); set "
                            "data.caption_key to the caption column"
                            if key != "file_name"
                            else f"{meta} line {number} has no 'file_name' (fields: {sorted(row)})"
                        )
                path = os.path.join(root, row["file_name"])
                if not path.lower().endswith(_IMAGE_SUFFIXES):
                    raise DataError(f"{meta} line {number}: {row['file_name']!r} is not an image file name")
                if not os.path.isfile(path):
                    raise DataError(f"{meta} line {number}: image {path} does not exist")
                files.append(path)
                texts.append(row[self.caption_key])
                label = row.get("label", 0)
                if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                    raise DataError(f"{meta} line {number}: label {label!r} must be a non-negative integer")
                labels.append(label)
        if not files:
            raise DataError(f"{meta} lists no images")
        self._files, self._texts = files, texts
        self._labels = np.asarray(labels, np.int32)
        self.num_classes = int(self._labels.max()) + 1 if self._labels.any() else None

    @property
    def image_shape(self) -> tuple:
        return (self.image_size, self.image_size, self.channels)

    def __len__(self) -> int:
        return len(self._files)

    def _image(self, index: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self._files[index]) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
            w, h = img.size
            scale = self.image_size / min(w, h)
            size = (max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
            left, top = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
            img = img.crop((left, top, left + self.image_size, top + self.image_size))
            array = np.asarray(img, dtype=np.uint8)
        return array[..., None] if array.ndim == 2 else array

    def __getitem__(self, index: int) -> dict:
        index = _check_index(index, len(self._files))
        return {"image": self._image(index), "label": self._labels[index], "caption": self._texts[index]}

    def read_fields(self, indices: Any) -> dict[str, np.ndarray]:
        indices = [_check_index(int(i), len(self._files)) for i in np.asarray(indices).reshape(-1)]
        if not indices:
            empty = np.zeros((0, *self.image_shape), np.uint8)
            return {"image": empty, "label": np.zeros((0,), np.int32), "caption": np.zeros((0,), str)}
        return {
            "image": np.stack([self._image(i) for i in indices]),
            "label": self._labels[indices],
            "caption": np.array([self._texts[i] for i in indices], dtype=str),
        }

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.directory!r}, split={self.split!r})"


# --------------------------------------------------------------------------- synthetic


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a counter-based hash, so any index can be generated alone."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class SyntheticSource:
    """Deterministic uniform-noise images for throughput benchmarks.

    Pixels are a counter-based hash of ``(seed, index, position)``, so records
    need no stored array and a batch is generated with a few vectorised numpy
    operations (``read_fields``) rather than one RNG per image.
    """

    def __init__(self, num_examples: int, image_size: int, channels: int, num_classes: int = 10, seed: int = 0) -> None:
        if num_examples <= 0 or image_size <= 0 or channels <= 0 or num_classes <= 0:
            raise DataError(
                "synthetic data needs positive num_examples, image_size, channels and num_classes; got "
                f"{num_examples}, {image_size}, {channels}, {num_classes}"
            )
        if seed < 0:
            raise DataError(f"synthetic seed must be non-negative, got {seed}")
        self.num_examples = int(num_examples)
        self.image_shape = (int(image_size), int(image_size), int(channels))
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        keys = _splitmix64(np.array([2 * self.seed, 2 * self.seed + 1], dtype=np.uint64))
        self._pixel_key, self._label_key = keys[0], keys[1]

    def __len__(self) -> int:
        return self.num_examples

    def read_fields(self, indices: Any) -> dict[str, np.ndarray]:
        """``{'image': uint8 [B, H, W, C], 'label': int32 [B]}`` for the given indices."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
            raise IndexError(f"indices out of range for a source of length {self.num_examples}")
        pixels = int(np.prod(self.image_shape))
        words = -(-pixels // 8)  # each 64-bit hash supplies 8 pixels (little-endian bytes)
        idx = indices.astype(np.uint64)[:, None]
        counters = idx * np.uint64(words) + np.arange(words, dtype=np.uint64)[None, :]
        noise = _splitmix64(counters + self._pixel_key)
        images = noise.astype("<u8", copy=False).view(np.uint8).reshape(len(indices), words * 8)[:, :pixels]
        labels = _splitmix64(idx[:, 0] + self._label_key) % np.uint64(self.num_classes)
        return {"image": images.reshape((len(indices),) + self.image_shape), "label": labels.astype(np.int32)}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = _check_index(index, self.num_examples)
        return {k: v[0] for k, v in self.read_fields([index]).items()}

    def __repr__(self) -> str:
        return (
            f"SyntheticSource({self.num_examples}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )


# --------------------------------------------------------------------------- batched reading


def _as_field(value: Any) -> np.ndarray:
    """One field of a batch as an array; text becomes a numpy str array (dtype kind 'U')."""
    array = np.asarray(value)
    # A fast-path reader may hand back an object array of str; callers get one text dtype whatever the source.
    if array.dtype == object and array.size and all(isinstance(v, str) for v in array.flat):
        array = array.astype(str)
    return array


def _read_records(source: Any, indices: np.ndarray) -> dict[str, Any]:
    if not len(indices):
        raise DataError(f"{source!r} reads records one at a time and cannot describe an empty batch; pass indices")
    records = [source[int(i)] for i in indices]
    names = list(records[0])
    for i, record in zip(indices, records):
        if sorted(record) != sorted(names):
            raise DataError(
                f"{source!r} record {int(i)} has fields {sorted(record)} but record {int(indices[0])} has "
                f"{sorted(names)}; every record of a source must have the same fields"
            )
    fields = {}
    for name in names:
        values = [record[name] for record in records]
        if all(isinstance(v, (str, np.str_)) for v in values):
            fields[name] = np.array(values, dtype=str)
            continue
        try:
            fields[name] = np.stack([np.asarray(v) for v in values])
        except ValueError as e:
            raise DataError(f"{source!r} returned {name!r} fields of different shapes in one batch: {e}") from e
    return fields


def read_fields(source: Any, indices: Any) -> dict[str, np.ndarray]:
    """Every field of ``source`` at ``indices``, as arrays with leading dimension ``B = len(indices)``.

    Always holds ``'image'`` ([B, H, W, C], the source's dtype: uint8 pixels or float latents) and ``'label'``
    (int32 [B]), plus each other field the source provides. Numeric fields are stacked ([B, ...]); text fields
    (Python ``str`` per record) become numpy str arrays, dtype kind ``'U'`` (e.g. ``'<U12'``), never object
    arrays, so ``list(batch['caption'])`` gives the strings back; ``bytes`` fields stay bytes (kind ``'S'``).

    Sources are read through, in this order: their own ``read_fields(indices) -> dict`` (the fast path),
    ``as_array() -> (images, labels)`` (whole split in memory), a tuple ``read_batch(indices) -> (images,
    labels)`` (e.g. research.latents.LatentCacheSource), or one ``source[i]`` per index.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if hasattr(source, "read_fields"):
        fields = source.read_fields(indices)
        if not isinstance(fields, Mapping):
            raise DataError(
                f"{source!r}.read_fields returned {type(fields).__name__}; it must return a dict of fields "
                "such as {'image': ..., 'label': ...}"
            )
    elif hasattr(source, "as_array"):
        images, labels = source.as_array()
        fields = {"image": images[indices], "label": labels[indices]}
    elif hasattr(source, "read_batch"):
        images, labels = source.read_batch(indices)
        fields = {"image": images, "label": labels}
    else:
        fields = _read_records(source, indices)
    missing = [name for name in ("image", "label") if name not in fields]
    if missing:
        raise DataError(
            f"{source!r} gave fields {sorted(fields)} without {missing}; every source must provide 'image' and "
            "'label' (use label 0 for unlabelled data)"
        )
    out = {}
    for name, value in fields.items():
        array = _as_field(value)
        if array.ndim == 0 or len(array) != len(indices):
            raise DataError(
                f"{source!r} field {name!r} has shape {array.shape} for a batch of {len(indices)} indices; "
                "every field needs the batch as its leading dimension"
            )
        out[name] = array
    out["label"] = out["label"].astype(np.int32, copy=False)
    return out


# --------------------------------------------------------------------------- factory

_PRETTY = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}
_TFDS_EQUIVALENT = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10"}
# Distinct synthetic splits must not share images.
_SYNTHETIC_SPLIT_OFFSET = {"train": 0, "test": 1, "validation": 2, "all": 3}


def _how_to_fix_dir(name: str) -> str:
    return (
        f"set {DATA_DIR_ENV} (a folder with a {name}/ subfolder) or --config.data.data_dir, "
        f"or use data.name='tfds' with tfds_name='{_TFDS_EQUIVALENT[name]}'"
    )


def _resolve_dir(data_config: Any, name: str) -> str:
    data_dir = _field(data_config, "data_dir", "") or ""
    if data_dir:
        return os.path.expanduser(data_dir)
    root = os.environ.get(DATA_DIR_ENV, "")
    if not root:
        raise DataError(
            f"data.name={name!r} needs its files, but data.data_dir is empty and "
            f"{DATA_DIR_ENV} is not set; {_how_to_fix_dir(name)}"
        )
    return os.path.join(os.path.expanduser(root), name)


def _check_shape(source: Any, data_config: Any, name: str) -> None:
    h, w, c = source.image_shape
    if h is None or w is None:
        raise DataError(
            f"{source!r} has variable-size images; this pipeline does not resize, "
            "so pick a data set with a fixed image size"
        )
    if h != w:
        raise DataError(f"{source!r} has non-square {h}x{w} images; only square images are supported")
    size = _field(data_config, "image_size", None)
    if size is not None and int(size) != h:
        raise DataError(f"{name} images are {h}x{w}x{c} but data.image_size={size}; set --config.data.image_size={h}")
    channels = _field(data_config, "channels", None)
    if channels is not None and c is not None and int(channels) != c:
        raise DataError(
            f"{name} images have {c} channel(s) but data.channels={channels}; set --config.data.channels={c}"
        )
    want = _field(data_config, "num_classes", None)
    have = getattr(source, "num_classes", None)
    # Fewer configured classes than labels would index past a class-embedding
    # table, which JAX clamps silently instead of failing.
    if want and have and int(want) < int(have):
        raise DataError(f"{name} has {have} classes but data.num_classes={want}; set --config.data.num_classes={have}")


def _missing_size() -> int:
    raise DataError("data.name='imagefolder' needs data.image_size (images are resized and centre-cropped to it)")


def get_source(data_config: Any, split: str = "train", *, check_shape: bool = True):
    """Builds the source described by ``data_config`` for ``split``.

    ``data_config`` fields: ``name`` (one of ``SOURCE_NAMES``), ``data_dir``
    ('' means ``$RESEARCH_DATA_DIR/<name>`` for mnist / fashion_mnist / cifar10
    and the TFDS default for tfds), ``tfds_name``, ``image_size``, ``channels``,
    ``num_classes``; synthetic data also reads the optional ``num_examples``
    and ``synthetic_seed``.

    Raises ``DataError`` for an unknown name, missing files or (unless
    ``check_shape=False``) an image shape or class count that disagrees with the
    config, before reading any pixel data.
    """
    name = str(_field(data_config, "name", "digits")).lower()
    if name not in SOURCE_NAMES:
        raise DataError(f"unknown data.name {name!r}; valid names: {', '.join(SOURCE_NAMES)}")
    if name == "digits":
        source = DigitsSource(split)
    elif name == "mnist_fashion":
        if split not in MnistFashionSource.SPLITS:
            raise DataError(f"mnist_fashion has no split {split!r}; valid splits: {MnistFashionSource.SPLITS}")
        root = _field(data_config, "data_dir", "") or os.environ.get(DATA_DIR_ENV, "")
        if not root:
            raise DataError(
                f"data.name='mnist_fashion' reads mnist/ and fashion_mnist/ under {DATA_DIR_ENV} or data.data_dir; "
                "set one of them"
            )
        root = os.path.expanduser(root)
        source = MnistFashionSource(os.path.join(root, "mnist"), os.path.join(root, "fashion_mnist"), split)
    elif name in ("mnist", "fashion_mnist", "cifar10"):
        cls = Cifar10Source if name == "cifar10" else IDXSource
        if split not in cls.SPLITS:
            raise DataError(f"{_PRETTY[name]} has no split {split!r}; valid splits: {cls.SPLITS}")
        directory = _resolve_dir(data_config, name)
        try:
            if name == "cifar10":
                source = Cifar10Source(directory, split)
            else:
                source = IDXSource(directory, split, dataset_name=_PRETTY[name])
        except DataError as e:
            raise DataError(f"{e}; {_how_to_fix_dir(name)}") from None
    elif name == "tfds":
        tfds_name = _field(data_config, "tfds_name", "") or ""
        if not tfds_name:
            raise DataError("data.name='tfds' needs data.tfds_name (e.g. --config.data.tfds_name=mnist)")
        source = TfdsSource(
            tfds_name,
            split,
            data_dir=_field(data_config, "data_dir", "") or None,
            caption_key=_field(data_config, "caption_key", "") or None,
        )
        name = f"TFDS {tfds_name!r}"
    elif name == "imagefolder":
        data_dir = _field(data_config, "data_dir", "") or ""
        if not data_dir:
            raise DataError(
                "data.name='imagefolder' needs data.data_dir: a folder with metadata.jsonl (file_name, text) "
                "per split, as Hugging Face's imagefolder reads"
            )
        source = ImageFolderSource(
            os.path.expanduser(data_dir),
            split,
            image_size=int(_field(data_config, "image_size", 0) or 0) or _missing_size(),
            channels=int(_field(data_config, "channels", 3) or 3),
            caption_key=_field(data_config, "caption_key", "") or "text",
        )
    else:  # synthetic
        size = _field(data_config, "image_size", None)
        channels = _field(data_config, "channels", None)
        if size is None or channels is None:
            raise DataError("data.name='synthetic' needs data.image_size and data.channels")
        base_seed = int(_field(data_config, "synthetic_seed", 0) or 0)
        offset = _SYNTHETIC_SPLIT_OFFSET.get(split)
        if offset is None:
            raise DataError(f"synthetic has no split {split!r}; valid splits: {tuple(_SYNTHETIC_SPLIT_OFFSET)}")
        source = SyntheticSource(
            num_examples=int(_field(data_config, "num_examples", 0) or 10_000),
            image_size=int(size),
            channels=int(channels),
            num_classes=int(_field(data_config, "num_classes", 0) or 10),
            seed=base_seed * len(_SYNTHETIC_SPLIT_OFFSET) + offset,
        )
    if check_shape:
        _check_shape(source, data_config, _PRETTY.get(name, name))
    return source
