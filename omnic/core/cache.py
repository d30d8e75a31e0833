"""Where omnic keeps state between runs: ``$OMNIC_CACHE_DIR``, default ``~/.cache/omnic``."""
from __future__ import annotations

import os
import re
from pathlib import Path


def cache_root() -> Path:
    """The cache root (created on first use)."""
    root = Path(os.environ.get("OMNIC_CACHE_DIR") or Path.home() / ".cache" / "omnic")
    root.mkdir(parents=True, exist_ok=True)
    return root


def device_dir(device: str, *parts: str) -> Path:
    """A per-device folder under the cache root, e.g. ``tuning/host-znver4``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", device)
    path = cache_root().joinpath(*parts[:-1], f"{parts[-1]}-{safe}" if parts else safe) if parts else \
        cache_root() / safe
    path.mkdir(parents=True, exist_ok=True)
    return path
