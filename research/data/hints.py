"""ControlNet hints: spatial control images computed from the training images themselves (jnp, jit-able).

Every extractor maps images [B, H, W, C] in the data range [-1, 1] to a hint [B, H, W, 1] in {0, 1} (edges, mask)
or [-1, 1] (blur), deterministic, so the same function makes training hints, sampling hints and the
controllability metric (research.metrics.control):

  sobel  Sobel gradient magnitude of the grey image, thresholded at `threshold` times the image's own maximum;
  canny  Canny's detector (1986): Gaussian smoothing (sigma 1, 5x5), Sobel gradients, non-maximum suppression
         across the edge (directions quantised to 0/45/90/135 degrees), then hysteresis: strong pixels (magnitude
         >= high * max) and the weak ones (>= low * max) connected to them;
  mask   the binary foreground (grey value above the middle of the range);
  blur   the image blurred by a Gaussian of sigma `sigma` (a low-frequency layout hint).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HINTS = ("sobel", "canny", "mask", "blur")


def _grey(images: jax.Array) -> jax.Array:
    """[B, H, W, C] in [-1, 1] -> [B, H, W] grey in [0, 1]."""
    return (jnp.mean(images.astype(jnp.float32), axis=-1) + 1.0) / 2.0


def _conv2d(x: jax.Array, kernel: np.ndarray) -> jax.Array:
    """[B, H, W] correlated with a 2-D kernel, edges replicated (no dark border)."""
    kh, kw = kernel.shape
    padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)), mode="edge")
    out = jax.lax.conv_general_dilated(
        padded[..., None], jnp.asarray(kernel, jnp.float32)[:, :, None, None], (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    return out[..., 0]


def gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    g = g / g.sum()
    return np.outer(g, g).astype(np.float32)


_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)


def _gradients(grey: jax.Array):
    gx, gy = _conv2d(grey, _SOBEL_X), _conv2d(grey, _SOBEL_X.T)
    return gx, gy, jnp.sqrt(gx**2 + gy**2)


def _relative(magnitude: jax.Array) -> jax.Array:
    """Magnitude divided by each image's maximum (a blank image stays 0)."""
    peak = jnp.max(magnitude, axis=(1, 2), keepdims=True)
    return magnitude / jnp.maximum(peak, 1e-6)


def sobel_edges(images: jax.Array, threshold: float = 0.3) -> jax.Array:
    _, _, magnitude = _gradients(_grey(images))
    return (_relative(magnitude) >= threshold).astype(jnp.float32)[..., None]


def _shift(x: jax.Array, dy: int, dx: int) -> jax.Array:
    """x[b, i + dy, j + dx] with zero outside."""
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1)))
    return padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def canny_edges(images: jax.Array, low: float = 0.1, high: float = 0.3, sigma: float = 1.0) -> jax.Array:
    grey = _conv2d(_grey(images), gaussian_kernel(sigma, 2))
    gx, gy, magnitude = _gradients(grey)
    magnitude = _relative(magnitude)
    # Direction of the gradient quantised to 0, 45, 90, 135 degrees (image rows grow downwards).
    angle = (jnp.degrees(jnp.arctan2(gy, gx)) + 180.0) % 180.0
    sector = jnp.round(angle / 45.0).astype(jnp.int32) % 4
    neighbours = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}  # (dy, dx) along the gradient
    keep = jnp.zeros_like(magnitude, bool)
    for s, (dy, dx) in neighbours.items():
        peak = (magnitude >= _shift(magnitude, dy, dx)) & (magnitude >= _shift(magnitude, -dy, -dx))
        keep = keep | ((sector == s) & peak)
    thin = jnp.where(keep, magnitude, 0.0)
    strong, weak = thin >= high, thin >= low

    def grow(edges, _):
        near = edges
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near = near | _shift(edges, dy, dx)
        return near & weak, None

    size = int(images.shape[1] * images.shape[2])
    edges, _ = jax.lax.scan(grow, strong, None, length=min(size, 64))
    return edges.astype(jnp.float32)[..., None]


def foreground_mask(images: jax.Array) -> jax.Array:
    return (_grey(images) > 0.5).astype(jnp.float32)[..., None]


def blurred(images: jax.Array, sigma: float = 2.0) -> jax.Array:
    radius = max(1, int(np.ceil(2 * sigma)))
    return (_conv2d(_grey(images), gaussian_kernel(sigma, radius)) * 2.0 - 1.0)[..., None]


def extract_hint(kind: str, images: jax.Array) -> jax.Array:
    """The hint named `kind` (one of HINTS) of images [B, H, W, C] in [-1, 1] -> [B, H, W, 1] float32."""
    if kind == "sobel":
        return sobel_edges(images)
    if kind == "canny":
        return canny_edges(images)
    if kind == "mask":
        return foreground_mask(images)
    if kind == "blur":
        return blurred(images)
    raise ValueError(f"hint {kind!r} is not known; choose one of {list(HINTS)}")
