"""Shared fixtures: every test session gets its own cache root, never ~/.cache/omnic."""
from __future__ import annotations

import os
import tempfile

_SESSION_CACHE = tempfile.mkdtemp(prefix="omnic-test-cache-")
os.environ["OMNIC_CACHE_DIR"] = _SESSION_CACHE
os.environ.setdefault("TVM_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache root of this test's own (for tests about what the cache holds)."""
    path = tmp_path / "omnic-cache"
    monkeypatch.setenv("OMNIC_CACHE_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
