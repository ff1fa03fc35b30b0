"""Training input pipeline (grain) and small array helpers.

The training iterator is a grain pipeline over example *indices*:

    range(N) -> shuffle (reseeded every epoch) -> batch(global_B, drop_remainder)
             -> repeat() -> [random_map: flip mask for the global batch]
             -> map: keep this process's slice, read every field, flip, scale

Shuffling and flip decisions are made for the whole global batch before it is
split across processes, so the union over processes of one step is exactly
the batch a single process would see, and the order does not depend on the
number of processes. The iterator's state is grain's ``{'next_index': step}``,
which is JSON-serialisable and restores the stream exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from research.data.sources import DataError, _field, get_source, read_fields

if TYPE_CHECKING:
    import grain

__all__ = [
    "to_model_range",
    "from_model_range",
    "make_train_iterator",
    "make_eval_arrays",
    "peek_shape",
    "read_examples",
    "IMAGE_FIELDS",
]

# Fields laid out like the image ([B, H, W, C]) that must stay pixel-aligned with it: the same horizontal flip per
# example, and uint8 -> model-range scaling. A ControlNet hint is such a field; add new spatial fields here.
IMAGE_FIELDS = ("image", "hint")


def to_model_range(images_uint8: Any, *, centered: bool = True) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (``centered``) or [0, 1]."""
    x = np.asarray(images_uint8, dtype=np.float32)
    return x / 127.5 - 1.0 if centered else x / 255.0


def from_model_range(x: Any, *, centered: bool = True) -> np.ndarray:
    """Model-range floats -> uint8 pixels (clipped, rounded); inverse of ``to_model_range``."""
    x = np.asarray(x, dtype=np.float32)
    x = (x + 1.0) * 127.5 if centered else x * 255.0
    return np.round(np.clip(x, 0.0, 255.0)).astype(np.uint8)


def read_examples(source: Any, indices: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, H, W, C], labels int32 [N])`` of ``source`` at ``indices``, whatever the source kind;
    ``read_fields`` without the other fields."""
    fields = read_fields(source, indices)
    return fields["image"], fields["label"]


def _indices_batch(items: Any) -> np.ndarray:
    return np.asarray(items, dtype=np.int64)


def _draw_flips(indices: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return indices, rng.random(len(indices)) < 0.5


def _no_flips(indices: np.ndarray) -> tuple[np.ndarray, None]:
    return indices, None


class _LocalBatch:
    """Turns a global batch of indices into this process's slice of every field of the source."""

    def __init__(self, source: Any, start: int, stop: int, centered: bool) -> None:
        self.source, self.start, self.stop, self.centered = source, start, stop, centered

    def __call__(self, item: tuple[np.ndarray, np.ndarray | None]) -> dict[str, np.ndarray]:
        indices, flips = item
        fields = read_fields(self.source, indices[self.start : self.stop])
        if flips is not None:
            flips = flips[self.start : self.stop]
        batch = {}
        for name, value in fields.items():
            if name in IMAGE_FIELDS:
                if value.ndim != 4:
                    raise DataError(
                        f"{self.source!r} field {name!r} has shape {value.shape}; image-like fields must be "
                        "[B, H, W, C]"
                    )
                if flips is not None:
                    value = np.where(flips[:, None, None, None], value[:, :, ::-1], value)
                # uint8 pixels are scaled to the model range; float sources (cached latent moments) are already there.
                if value.dtype == np.uint8:
                    value = to_model_range(value, centered=self.centered)
                value = np.asarray(value, dtype=np.float32)
            elif name == "label":
                value = value.astype(np.int32, copy=False)
            batch[name] = value
        return batch


def make_train_iterator(
    data_config: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
    source: Any = None,
) -> "grain.DatasetIterator":
    """Infinite, shuffled, checkpointable iterator of this process's training batches.

    Yields every field of the source (see ``read_fields``), at least
    ``{'image': float32 [B, H, W, C], 'label': int32 [B]}``, with
    ``B = global_batch_size // process_count``. uint8 images are scaled to
    [-1, 1], or [0, 1] when ``data_config.centered`` is False; float images
    (latents) are only cast to float32. A ``'hint'`` field (``IMAGE_FIELDS``)
    is treated exactly like the image: same scaling, and the same flip per
    example. Other numeric fields pass through unchanged, text fields as numpy
    str arrays [B] (host-side only: they cannot become jax arrays).
    ``data_config.random_flip`` enables deterministic horizontal flips.
    Reading happens in the calling thread unless ``data_config.num_threads``
    > 0. ``source`` replaces the configured one (e.g. a latent cache,
    research.latents.LatentCacheSource).
    """
    import grain

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"invalid process_index={process_index} for process_count={process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}"
        )
    if source is None:
        source = get_source(data_config, split)
    num_examples = len(source)
    if num_examples < global_batch_size:
        raise DataError(
            f"{source!r} has {num_examples} examples, fewer than global_batch_size="
            f"{global_batch_size}; with drop_remainder no batch could be formed"
        )
    local = global_batch_size // process_count

    ds = grain.MapDataset.range(num_examples).seed(int(seed)).shuffle()
    # Batching before repeat() keeps every batch inside one epoch, so an epoch
    # covers each example once (minus the dropped remainder).
    ds = ds.batch(global_batch_size, drop_remainder=True, batch_fn=_indices_batch).repeat()
    if _field(data_config, "random_flip", False):
        ds = ds.random_map(_draw_flips)
    else:
        ds = ds.map(_no_flips)
    ds = ds.map(
        _LocalBatch(
            source,
            start=process_index * local,
            stop=(process_index + 1) * local,
            centered=bool(_field(data_config, "centered", True)),
        )
    )
    num_threads = int(_field(data_config, "num_threads", 0) or 0)
    # In-memory sources are fastest read in-thread: worker threads would only
    # contend for the GIL.
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    return iter(ds.to_iter_dataset(read_options))


def make_eval_arrays(data_config: Any, split: str = "test", num: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """First ``num`` examples of ``split`` (all if None): ``(uint8 [N,H,W,C], int32 [N])``."""
    source = get_source(data_config, split)
    total = len(source)
    if num is None:
        num = total
    if not 0 < num <= total:
        raise DataError(f"asked for {num} examples but {source!r} has {total}")
    images, labels = read_examples(source, np.arange(num))
    # Copies, so callers may modify them without touching the source's cache.
    return np.array(images, dtype=np.uint8), np.array(labels, dtype=np.int32)


def peek_shape(data_config: Any, split: str = "train") -> tuple[int, int, int]:
    """``(H, W, C)`` of the configured data set without reading pixel data.

    Also validates the config (names, files, image_size / channels) and raises
    ``DataError`` with the fix when something disagrees.
    """
    return tuple(get_source(data_config, split).image_shape)
