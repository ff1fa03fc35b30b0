"""Where metric networks and reference statistics are cached: $RESEARCH_CACHE_DIR, else ~/.cache/research."""

from __future__ import annotations

import hashlib
import os

CACHE_ENV = "RESEARCH_CACHE_DIR"


def cache_dir(*parts: str, create: bool = True) -> str:
    """The cache directory (or a subdirectory of it), created on first use."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "research"
    )
    path = os.path.join(root, *parts)
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def file_digest(path: str, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
