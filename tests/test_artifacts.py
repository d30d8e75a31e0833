"""Exported artifacts are verified before they are loaded (issue 27, section 2, "artifacts").

Every test damages a real exported artifact (a real TVM build of a tiny model) the way a user's
disk, copy or editor would, and expects `omnic.load` to refuse it with an `ArtifactError` that says
what to do, instead of a raw traceback, a silent load or a crashed process.
"""
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import omnic
from omnic import engine
from omnic.compile import runtime


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny host build, exported once; tests damage copies of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(1, 8)
    dm = engine.compile(model, "host", x)
    out = dm.export(tmp_path_factory.mktemp("artifact") / "tiny")
    return out, model, x


@pytest.fixture
def artifact(exported, tmp_path):
    """A fresh copy of the exported artifact that a test may damage."""
    src, _, _ = exported
    return shutil.copytree(src, tmp_path / "copy")


def read_meta(path):
    return json.loads((path / "metadata.json").read_text())


def write_meta(path, meta):
    (path / "metadata.json").write_text(json.dumps(meta, indent=2))


def load_in_subprocess(path):
    """Load in a child process: a SIGBUS there shows up as a negative return code, not as a dead
    test run. Exit 0: ArtifactError raised (its message on stdout); 3: it loaded."""
    script = textwrap.dedent(f"""
        import sys, omnic
        try:
            omnic.load({str(path)!r})
        except omnic.ArtifactError as exc:
            print(exc)
            sys.exit(0)
        sys.exit(3)
    """)
    return subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))


# ---------------------------------------------------------------- 1. sha256 of every file


def test_export_records_the_sha256_and_size_of_every_file(exported):
    out, model, x = exported
    meta = read_meta(out)
    assert meta["artifact_version"] == runtime.ARTIFACT_VERSION >= 2
    files = sorted(p.name for p in out.iterdir() if p.name != "metadata.json")
    assert sorted(meta["checksums"]) == files == sorted(meta["files"])
    for name, record in meta["checksums"].items():
        data = (out / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    loaded = omnic.load(out)  # an intact artifact still loads and runs
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_truncated_library_is_refused_before_dlopen_and_the_process_survives(artifact):
    lib = artifact / "model.so"
    os.truncate(lib, lib.stat().st_size // 2)  # the unfixed load died here with SIGBUS
    proc = load_in_subprocess(artifact)
    assert proc.returncode == 0, f"rc={proc.returncode} stdout={proc.stdout!r} stderr={proc.stderr[-2000:]!r}"
    assert "model.so" in proc.stdout and "truncated" in proc.stdout and "re-export" in proc.stdout


def test_library_modified_in_place_is_refused(artifact):
    lib = artifact / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte differs: only the hash can tell
    lib.write_bytes(bytes(data))
    with pytest.raises(omnic.ArtifactError, match="model.so") as info:
        omnic.load(artifact)
    assert "sha256" in str(info.value) and "re-export" in str(info.value)


def test_missing_file_is_named(artifact):
    (artifact / "model.so").unlink()
    with pytest.raises(omnic.ArtifactError, match="model.so.*missing"):
        omnic.load(artifact)


def test_library_outside_the_folder_is_refused(artifact):
    meta = read_meta(artifact)
    meta["library"] = "../elsewhere/model.so"
    write_meta(artifact, meta)
    with pytest.raises(omnic.ArtifactError, match="'library'"):
        omnic.load(artifact)


# ---------------------------------------------------------------- 2. metadata.json and version


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\xff\xfe garbage"])
def test_corrupt_metadata_names_the_file(artifact, text):
    (artifact / "metadata.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(omnic.ArtifactError, match="metadata.json") as info:
        omnic.load(artifact)
    assert "re-export" in str(info.value)


@pytest.mark.parametrize("key", ["library", "deployment", "inputs", "output_is_tuple", "structural_hash",
                                 "artifact_version", "checksums"])
def test_missing_metadata_key_is_named(artifact, key):
    meta = read_meta(artifact)
    del meta[key]
    write_meta(artifact, meta)
    with pytest.raises(omnic.ArtifactError, match=f"'{key}'") as info:
        omnic.load(artifact)
    assert "metadata.json" in str(info.value)


@pytest.mark.parametrize("key,value", [
    ("inputs", "1,8"), ("inputs", [{"shape": ["a", 8], "dtype": "float32"}]), ("inputs", [{"shape": [1, 8]}]),
    ("output_is_tuple", "no"), ("library", 7), ("deployment", [1]), ("deployment", {"device": "nowhere"}),
    ("artifact_version", "2"), ("checksums", {"model.so": "abc"}), ("cpu", {"arch": 1}),
    ("report", "fine"), ("files", "model.so"),
])
def test_metadata_value_of_wrong_type_is_named(artifact, key, value):
    meta = read_meta(artifact)
    meta[key] = value
    write_meta(artifact, meta)
    with pytest.raises(omnic.ArtifactError, match=f"'{key}") as info:
        omnic.load(artifact)
    assert "metadata.json" in str(info.value)


def test_artifact_from_a_newer_omnic_is_refused(artifact):
    meta = read_meta(artifact)
    meta["artifact_version"] = 99
    write_meta(artifact, meta)
    with pytest.raises(omnic.ArtifactError, match="newer omnic") as info:
        omnic.load(artifact)
    assert "upgrade" in str(info.value)


def _as_version_1(path):
    """Rewrite the metadata the way omnic wrote it before checksums and the CPU record."""
    meta = read_meta(path)
    meta["artifact_version"] = 1
    del meta["checksums"], meta["cpu"]
    write_meta(path, meta)


def test_version_1_artifact_loads_with_a_warning(exported, artifact):
    _, model, x = exported
    _as_version_1(artifact)
    with pytest.warns(UserWarning, match="no checksums"):
        loaded = omnic.load(artifact)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_truncated_version_1_library_is_still_caught(artifact):
    """Without hashes the ELF headers tell a truncated library apart before dlopen."""
    _as_version_1(artifact)
    lib = artifact / "model.so"
    os.truncate(lib, lib.stat().st_size // 2)
    proc = load_in_subprocess(artifact)
    assert proc.returncode == 0, f"rc={proc.returncode} stdout={proc.stdout!r} stderr={proc.stderr[-2000:]!r}"
    assert "model.so" in proc.stdout and "truncated" in proc.stdout


# ---------------------------------------------------------------- 3. CPU features


def test_export_records_the_cpu_the_build_needs(exported):
    from omnic.compile.target import ISA_FEATURES, host_isa_features

    out, _, _ = exported
    cpu = read_meta(out)["cpu"]
    assert cpu["arch"] and cpu["mcpu"]
    assert set(cpu["features"]) <= set(ISA_FEATURES)
    # a host build needs nothing this host lacks
    assert set(cpu["features"]) <= host_isa_features()


def test_build_needing_a_feature_this_cpu_lacks_is_refused(artifact):
    from omnic.compile.target import ISA_FEATURES, host_isa_features

    lacking = sorted(set(ISA_FEATURES) - host_isa_features())
    if not lacking:
        pytest.skip("this CPU has every feature omnic checks")
    meta = read_meta(artifact)
    cpu = meta.setdefault("cpu", {"arch": platform.machine(), "features": []})
    cpu["features"] = sorted(set(cpu["features"]) | {lacking[0]})
    write_meta(artifact, meta)
    with pytest.raises(omnic.ArtifactError, match=lacking[0]) as info:
        omnic.load(artifact)
    assert "SIGILL" in str(info.value) or "illegal instruction" in str(info.value)


def test_build_for_another_architecture_is_refused(artifact):
    meta = read_meta(artifact)
    meta.setdefault("cpu", {"features": []})["arch"] = "riscv64"
    write_meta(artifact, meta)
    with pytest.raises(omnic.ArtifactError, match="riscv64"):
        omnic.load(artifact)


def test_remote_artifact_is_not_checked_against_this_cpu(artifact):
    """A board's artifact runs on the board: this machine's CPU is not the one that matters."""
    meta = read_meta(artifact)
    meta["deployment"]["device"] = "rasp4b"
    meta["cpu"] = {"arch": "aarch64", "triple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                   "features": ["neon", "sve2"]}
    write_meta(artifact, meta)
    loaded = omnic.load(artifact)
    assert loaded.deployment.device == "rasp4b"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        omnic.load(artifact)
