"""Where omnic keeps state between runs: ``$OMNIC_CACHE_DIR``, default ``~/.cache/omnic``.

Trust model: the cache holds compiled libraries that omnic loads and runs (the predictor's
saved libraries are dlopened), tuning records and measured latencies, so whoever can write it can
make omnic run their code or answer wrongly. As ssh does with ``~/.ssh``, the root is created
private (mode 0700), and a root that the group or others can write, or that another user owns
(root excepted), is refused with a :class:`~omnic.core.errors.CacheError` naming the fix. Below
the root, files are checked where they are used (a library's sha256 before it is loaded).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from omnic.core.errors import CacheError, describe


def cache_root() -> Path:
    """The cache root, created private (mode 0700) on first use.

    Raises:
        CacheError: The root cannot be created (a file in the way, no permission), or it is not
            safe to use: writable by group or others, or owned by another user.
    """
    root = Path(os.environ.get("OMNIC_CACHE_DIR") or Path.home() / ".cache" / "omnic")
    make_dir(root)
    check_private(root)
    return root


def make_dir(path: Path) -> None:
    """``mkdir -p -m 0700 path`` (the mode applies to the folders it creates, not to existing ones).

    Raises:
        CacheError: The folder cannot be created; names it and what to do.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way (FileExists/NotADirectory), no permission, read-only fs
        raise CacheError(f"cannot create the omnic cache folder {path}: {describe(exc)}; set "
                         "OMNIC_CACHE_DIR to a writable directory of your own") from exc


def check_private(path: Path) -> None:
    """Refuse a folder that others could write code into (as ssh refuses a lax ``~/.ssh``).

    Raises:
        CacheError: ``path`` is writable by its group or by others, or owned by a user other than
            this one or root.
    """
    info = path.stat()
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheError(f"the omnic cache folder {path} is writable by its group or by others (mode "
                         f"{stat.S_IMODE(info.st_mode):03o}), so they could make omnic run their code; "
                         f"run `chmod 700 {path}`, or set OMNIC_CACHE_DIR to a private directory")
    getuid = getattr(os, "getuid", None)  # POSIX only: Windows has no owner ids to compare
    if getuid is not None and info.st_uid not in (getuid(), 0):
        raise CacheError(f"the omnic cache folder {path} is owned by user id {info.st_uid}, not by you "
                         f"({getuid()}), so they could make omnic run their code; set OMNIC_CACHE_DIR "
                         "to a directory of your own")


def device_dir(device: str, *parts: str) -> Path:
    """A per-device folder under the cache root, e.g. ``tuning/host-znver4``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", device)
    path = cache_root().joinpath(*parts[:-1], f"{parts[-1]}-{safe}" if parts else safe) if parts else \
        cache_root() / safe
    make_dir(path)
    return path
