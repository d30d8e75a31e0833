"""The cache root's trust model: created private, refused when others can write it (as ssh refuses
keys), a typed error when it cannot be created, and no predictor library loaded from it unless its
sha256 is the one recorded when omnic wrote it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from omnic import CacheError
from omnic.core.cache import cache_root
from omnic.core.errors import PredictorError
from omnic.core.measure import MeasureConfig
from omnic.oracle import predictor as P
from omnic.oracle.predictor import samples as S
from tests.unprivileged import remove_tree, run_unprivileged, shared_tmpdir


def test_a_new_cache_root_is_private(tmp_path, monkeypatch):
    root = tmp_path / "home" / "cache"
    monkeypatch.setenv("OMNIC_CACHE_DIR", str(root))
    assert cache_root() == root
    assert root.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_cache_root_others_can_write_is_refused(tmp_path, monkeypatch, mode):
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(mode)
    monkeypatch.setenv("OMNIC_CACHE_DIR", str(root))
    with pytest.raises(CacheError, match=f"chmod 700 {root}") as err:
        cache_root()
    assert "writable by" in str(err.value)
    root.chmod(0o700)  # the fix the message gives
    assert cache_root() == root


def test_a_cache_root_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("OMNIC_CACHE_DIR", str(root))
    if os.geteuid() == 0:
        os.chown(root, 4242, -1)  # a real other owner: root may give a folder away
    else:  # a non-root user cannot give a folder away; pretend to be someone else instead
        me = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: me + 1)
    with pytest.raises(CacheError, match="owned by") as err:
        cache_root()
    assert str(root) in str(err.value) and "OMNIC_CACHE_DIR" in str(err.value)


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_a_cache_root_that_cannot_be_created_is_a_typed_error(tmp_path, monkeypatch, where):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    root = blocker / "cache" if where == "under_a_file" else blocker
    monkeypatch.setenv("OMNIC_CACHE_DIR", str(root))
    with pytest.raises(CacheError, match="set OMNIC_CACHE_DIR to a writable directory") as err:
        cache_root()
    assert str(root) in str(err.value)


def test_a_cache_root_without_permission_is_a_typed_error(monkeypatch):
    base = shared_tmpdir()
    try:
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        monkeypatch.setenv("OMNIC_CACHE_DIR", str(locked / "cache"))

        def check():
            try:
                cache_root()
            except Exception as exc:  # noqa: BLE001 - the type is what the test checks
                return {"type": type(exc).__name__, "message": str(exc)}
            return {"type": None, "message": ""}

        seen = run_unprivileged(check)
    finally:
        remove_tree(base)
    assert seen["type"] == "CacheError", seen
    assert str(locked / "cache") in seen["message"] and "PermissionError" in seen["message"]


# --- predictor libraries: dlopened from the cache, so verified first ---------------------------

TINY = P.Variant(family="resnet", params=(("layers", (1, 1)), ("num_classes", 10), ("stem", "small"),
                                          ("widths", (8, 16))), resolution=16)
CHEAP = {"config": MeasureConfig(min_repeat_ms=5, repeats=3, max_rounds=1, time_budget_s=0.1), "runs": 3,
         "passes": 2}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def collected(fresh_cache, monkeypatch):
    """One measured tiny variant, its saved library, and a log of what gets loaded (the real loader,
    wrapped: each load records the sha256 of the file as it was when TVM opened it)."""
    sample = P.collect_sample(TINY, "host", **CHEAP)
    library = S._library_path("host", sample["key"])
    loaded: list[str] = []
    real = S.features.load_library

    def spy(path):
        loaded.append(_sha(Path(path)))
        return real(path)

    monkeypatch.setattr(S.features, "load_library", spy)
    return sample, library, loaded


def test_a_saved_library_has_its_hash_recorded_and_is_loaded_when_it_matches(collected):
    sample, library, loaded = collected
    recorded = S.recorded_sha256(library)
    assert recorded == _sha(library)
    P.remeasure(sample, "host", **CHEAP)
    assert loaded == [recorded] and sample["sessions"] == 2


@pytest.mark.parametrize("damage", ["tampered", "hash_missing"])
def test_a_library_that_fails_its_hash_is_rebuilt_never_loaded(collected, damage):
    sample, library, loaded = collected
    if damage == "tampered":
        data = bytearray(library.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one byte in the middle: still a loadable ELF file
        library.write_bytes(bytes(data))
    else:
        S._hash_path(library).unlink()
    bad = _sha(library)
    P.remeasure(sample, "host", **CHEAP)
    assert loaded == []  # the damaged file never reached the loader: the session ran a rebuild
    assert sample["sessions"] == 2
    assert _sha(library) == S.recorded_sha256(library)  # saved again, with its hash
    if damage == "tampered":
        assert _sha(library) != bad
    P.remeasure(sample, "host", **CHEAP)  # and the next session loads the rebuilt file
    assert loaded == [_sha(library)] and sample["sessions"] == 3


def test_a_library_that_cannot_be_rebuilt_is_refused(collected):
    sample, library, loaded = collected
    library.write_bytes(library.read_bytes() + b"\0")
    orphan = dict(sample, variant=None)  # a sample that no longer says what it measured
    with pytest.raises(PredictorError, match="collect it again") as err:
        P.remeasure(orphan, "host", **CHEAP)
    assert str(library) in str(err.value) and loaded == []
