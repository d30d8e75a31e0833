"""Run a check where file permissions apply.

The tests run as root here, and root writes through any mode bits, so a `chmod 0444` proves
nothing in-process. As root, the check runs in a forked child that dropped to the unprivileged
user ``nobody``: the kernel's permission checks are real there. As anyone else, the check runs in
this process.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

NOBODY = 65534


def shared_tmpdir() -> Path:
    """A fresh directory ``nobody`` can enter (pytest's ``tmp_path`` sits under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="omnic-perm-"))
    path.chmod(0o755)
    return path


def remove_tree(path: Path) -> None:
    """Give write permission back everywhere under ``path``, then delete it."""
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    if path.exists():
        path.chmod(0o755)
        shutil.rmtree(path, ignore_errors=True)


def run_unprivileged(check: Callable[[], Any]) -> Any:
    """``check()``'s JSON-able result, computed where permission bits are enforced.

    Skips the test when this process is root and cannot drop to ``nobody`` (no fork, no setuid).
    """
    if os.geteuid() != 0:
        return check()
    if not hasattr(os, "fork"):
        pytest.skip("running as root without os.fork: permission bits cannot be made to apply")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest, whatever happens
        try:
            os.close(read_end)
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as exc:
                out = {"skip": f"cannot drop root to uid {NOBODY}: {exc}"}
            else:
                try:
                    out = {"result": check()}
                except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails
                    out = {"error": traceback.format_exc(), "type": type(exc).__name__}
            with os.fdopen(write_end, "w") as f:
                json.dump(out, f)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        text = f.read()
    os.waitpid(pid, 0)
    out = json.loads(text) if text else {"error": "the unprivileged child died without a result"}
    if "skip" in out:
        pytest.skip(out["skip"])
    if "error" in out:
        pytest.fail(f"the check failed as uid {NOBODY}:\n{out['error']}")
    return out["result"]
