"""Sample grids as PNG files."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1, min_cell: int = 32) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one [rows*H', cols*W', C] image; small images are enlarged by an
    integer nearest-neighbour factor so an 8x8 digit is still legible."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"make_grid expects uint8 images, got {images.dtype}")
    n, h, w, c = images.shape
    zoom = max(1, math.ceil(min_cell / max(h, w)))
    if zoom > 1:
        images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
        h, w = h * zoom, w * zoom
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return grid


def save_grid(images: np.ndarray, path: str, ncols: int | None = None) -> str:
    grid = make_grid(images, ncols)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path
