"""Silencing the known noise of the libraries omnic drives, where omnic drives them.

Two kinds: Python warnings that torch raises inside calls omnic makes (filtered around those
calls only, by message), and lines TVM's C++ runtime writes straight to file descriptor 2
(``LOG(WARNING) << "Scope Saving:"`` once per memory scope on every ``export_library``), which no
Python filter can reach: those are captured around the call and every other line is written back.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
import warnings
from typing import Iterator

#: torch.export's run_decompositions deep-copies pytree specs, and typing_extensions' deprecation
#: shim warns on every copy: one FutureWarning per compile, about torch's code, not the user's.
_KNOWN_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)

#: TVM prints one of these per memory scope each time a Relax executable is serialised.
TVM_EXPORT_NOISE = (re.compile(r"executable\.cc:\d+: Warning: Scope Saving:"),)

_FD_LOCK = threading.RLock()  # fd 2 is process-wide: one redirection at a time


@contextlib.contextmanager
def known_warnings_filtered() -> Iterator[None]:
    """Ignore the specific third-party warnings omnic is known to trigger (``_KNOWN_WARNINGS``);
    every other warning is shown as usual."""
    with warnings.catch_warnings():
        for category, message in _KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextlib.contextmanager
def native_stderr_filtered(patterns: tuple[re.Pattern, ...] = TVM_EXPORT_NOISE) -> Iterator[None]:
    """Drop the lines matching ``patterns`` that native code writes to fd 2 inside the block.

    Everything else written to stderr meanwhile (by C++ or Python) is written back when the block
    ends. Where fd 2 cannot be redirected (no real descriptor), the block runs unfiltered.
    """
    with _FD_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            yield
            return
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                try:
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                        if not any(p.search(line) for p in patterns)]
                if kept:
                    os.write(2, "".join(kept).encode())
