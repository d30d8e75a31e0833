"""An exported artifact's ``metadata.json``: written with checksums, read back only after checks.

:meth:`omnic.compile.runtime.DeviceModel.export` records the sha256 and size of every file and the
CPU the build needs; :func:`read_verified` checks the metadata's shape, its version, every file and
(for builds that run here) this CPU *before* anything is loaded. Loading a damaged library is not
an ordinary error: ``dlopen`` maps it into the process, and a truncated one kills the process with
SIGBUS, code for a missing CPU feature with SIGILL. So the checks have to come first.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from omnic import __version__
from omnic.compile.target import cpu_record, host_arch, host_cpu_name, host_isa_features
from omnic.core.deployment import Deployment
from omnic.core.errors import ArtifactError, OmnicError, describe

#: Version of the artifact layout this omnic writes. 2: ``checksums`` (sha256 and size of every
#: file) and ``cpu`` (architecture, mcpu and ISA features the build needs) were added.
ARTIFACT_VERSION = 2
#: Version 1 artifacts (no checksums) still load, with a warning; see :func:`read_verified`.
OLDEST_ARTIFACT_VERSION = 1
METADATA = "metadata.json"
_REEXPORT = "re-export the model with DeviceModel.export(dir), or copy the whole artifact folder again"


def file_checksums(directory: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256": hex, "bytes": size}}`` for the named files of ``directory``."""
    return {name: {"sha256": _sha256(directory / name), "bytes": (directory / name).stat().st_size}
            for name in names}


def write_metadata(directory: Path, meta: Mapping[str, Any]) -> None:
    """Write ``metadata.json`` through a temporary file, so an interrupted export leaves no
    half-written metadata (and with it no artifact that looks complete)."""
    tmp = directory / f".{METADATA}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, directory / METADATA)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_verified(directory: str | os.PathLike) -> tuple[dict[str, Any], Deployment]:
    """Read an artifact's metadata and verify the artifact before anything of it is loaded.

    Checks, in order: the metadata is a JSON object with every key of the right type; its version
    is one this omnic reads; every file has the sha256 and size recorded at export (version 1
    artifacts, which have no checksums, load with a warning after an ELF completeness check of the
    library); and, for builds that run on this machine, that this CPU has the architecture and the
    instruction-set features the build needs.

    Args:
        directory: The folder :meth:`DeviceModel.export` wrote.

    Returns:
        The metadata and its deployment.

    Raises:
        ArtifactError: Naming the file (and key) at fault and what to do.
    """
    path = Path(directory)
    meta_path = path / METADATA
    if not meta_path.is_file():
        raise ArtifactError(f"{path} has no {METADATA}; export a model with DeviceModel.export(dir) first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise ArtifactError(f"{meta_path} cannot be read as JSON ({describe(exc)}); {_REEXPORT}") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{meta_path} holds a JSON {type(meta).__name__}, not an object; {_REEXPORT}")
    version = _check_version(meta, meta_path)
    _check_schema(meta, meta_path, version)
    try:
        deployment = Deployment.coerce(meta["deployment"])
    except OmnicError as exc:
        raise ArtifactError(f"{meta_path}: key 'deployment' is not a deployment this omnic knows "
                            f"({describe(exc)}); {_REEXPORT}") from exc
    runs_here = deployment.spec.local and not deployment.is_remote
    if version >= 2:
        _check_files(path, meta["checksums"])
    else:
        _warn_unverified(path, meta, runs_here)
    if runs_here:
        _check_cpu(path / meta["library"], meta.get("cpu") if version >= 2 else _v1_cpu(meta))
    return meta, deployment


# ------------------------------------------------------------------ the metadata's shape


def _check_version(meta: dict[str, Any], meta_path: Path) -> int:
    version = _require(meta, "artifact_version", meta_path, int, "an integer")
    if version > ARTIFACT_VERSION:
        raise ArtifactError(
            f"{meta_path.parent} was exported by a newer omnic (artifact version {version}; omnic "
            f"{__version__} reads versions {OLDEST_ARTIFACT_VERSION} to {ARTIFACT_VERSION}); upgrade omnic "
            "(pip install -U omnic) to load it, or re-export the model with this version")
    if version < OLDEST_ARTIFACT_VERSION:
        raise ArtifactError(f"{meta_path}: key 'artifact_version' is {version}, which no omnic writes; "
                            f"{_REEXPORT}")
    return version


def _require(meta: Mapping[str, Any], key: str, meta_path: Path, kind: type | tuple[type, ...],
             expected: str, optional: bool = False) -> Any:
    """``meta[key]`` when it has type ``kind`` (bool is not an int here), else an ArtifactError."""
    if key not in meta:
        if optional:
            return None
        raise ArtifactError(f"{meta_path} has no key '{key}': the file is incomplete; {_REEXPORT}")
    value = meta[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        _wrong(meta_path, key, expected, value)
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _wrong(meta_path: Path, key: str, expected: str, value: Any) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise ArtifactError(f"{meta_path}: key '{key}' must be {expected}, got {shown}; the file was edited "
                        f"or damaged; {_REEXPORT}")


def _plain_name(name: Any) -> bool:
    """A file name inside the artifact folder (no directories, no way out of the folder)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _check_schema(meta: dict[str, Any], meta_path: Path, version: int) -> None:
    library = _require(meta, "library", meta_path, str, "a file name")
    if not _plain_name(library):
        _wrong(meta_path, "library", "a file name inside the artifact folder", library)
    _require(meta, "deployment", meta_path, dict, "an object (a deployment)")
    _require(meta, "output_is_tuple", meta_path, bool, "true or false")
    _require(meta, "structural_hash", meta_path, str, "a string")
    _require(meta, "report", meta_path, dict, "an object", optional=True)
    files = _require(meta, "files", meta_path, list, "a list of file names", optional=True)
    if files is not None and not all(_plain_name(f) for f in files):
        _wrong(meta_path, "files", "a list of file names", files)
    inputs = _require(meta, "inputs", meta_path, list, "a list of {'shape': [int, ...], 'dtype': str}")
    for i, spec in enumerate(inputs):
        if not (isinstance(spec, dict) and isinstance(spec.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec["shape"])
                and isinstance(spec.get("dtype"), str) and _is_dtype(spec["dtype"])):
            _wrong(meta_path, f"inputs[{i}]", "{'shape': [int, ...], 'dtype': str}", spec)
    if version < 2:
        return
    checksums = _require(meta, "checksums", meta_path, dict, "an object {file: {'sha256', 'bytes'}}")
    for name, record in checksums.items():
        if not (_plain_name(name) and isinstance(record, dict) and isinstance(record.get("sha256"), str)
                and len(record["sha256"]) == 64 and isinstance(record.get("bytes"), int)):
            _wrong(meta_path, f"checksums[{name!r}]", "{'sha256': 64 hex digits, 'bytes': int}", record)
    unlisted = sorted(set(files or ()) - set(checksums))
    if unlisted:
        raise ArtifactError(f"{meta_path}: key 'checksums' has no entry for {unlisted}; {_REEXPORT}")
    if library not in checksums:
        raise ArtifactError(f"{meta_path}: key 'checksums' has no entry for the library {library!r}; "
                            f"{_REEXPORT}")
    cpu = _require(meta, "cpu", meta_path, (dict, type(None)), "an object or null")
    names_ok = cpu is None or all(isinstance(cpu.get(k), (str, type(None))) for k in ("arch", "triple", "mcpu"))
    if cpu is not None and not (names_ok and isinstance(cpu.get("features"), list)
                                and all(isinstance(f, str) for f in cpu["features"])):
        _wrong(meta_path, "cpu", "{'arch': str, 'triple': str, 'mcpu': str, 'features': [str, ...]}", cpu)


def _is_dtype(name: str) -> bool:
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True


# ------------------------------------------------------------------ the files


def _check_files(path: Path, checksums: Mapping[str, Mapping[str, Any]]) -> None:
    for name, record in checksums.items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{file} is missing: the artifact folder is incomplete (metadata.json lists "
                                f"{sorted(checksums)}); {_REEXPORT}")
        size = file.stat().st_size
        if size != record["bytes"]:
            state = "truncated" if size < record["bytes"] else "longer than it was"
            raise ArtifactError(f"{file} is damaged: {state} ({size} bytes, {record['bytes']} at export); "
                                f"{_REEXPORT}")
        digest = _sha256(file)
        if digest != record["sha256"]:
            raise ArtifactError(
                f"{file} is damaged: its sha256 ({digest[:16]}...) differs from the one recorded at export "
                f"({record['sha256'][:16]}...), so it was modified after export; {_REEXPORT}")


def _warn_unverified(path: Path, meta: Mapping[str, Any], runs_here: bool) -> None:
    """Version 1 artifacts have no checksums. They still load: they were valid when written and
    their model may be gone, so refusing them would strand deployed builds. The library is still
    checked for truncation (the SIGBUS case) where it is about to be loaded here."""
    library = path / meta["library"]
    if not library.is_file():
        raise ArtifactError(f"{library} is missing: the artifact folder is incomplete; {_REEXPORT}")
    if runs_here:
        problem = elf_truncation(library)
        if problem is not None:
            raise ArtifactError(f"{library} is damaged: {problem}; {_REEXPORT}")
    warnings.warn(f"{path} has no checksums (artifact version 1, exported by an older omnic): its files "
                  "cannot be verified before loading; re-export it with this omnic to have them checked",
                  UserWarning, stacklevel=4)  # points at the caller of omnic.load


def elf_truncation(path: Path) -> str | None:
    """What is cut off an ELF shared library (``None`` if complete or not ELF).

    A library shorter than its own headers say is the one that dlopen maps and then faults on
    (SIGBUS): every segment and the section header table must lie inside the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or len(head) < 52:
            return None if head[:4] != b"\x7fELF" else f"truncated ({size} bytes, less than an ELF header)"
        wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
        if wide:
            phoff, shoff = struct.unpack_from(order + "QQ", head, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", head, 0x36)
        else:
            phoff, shoff = struct.unpack_from(order + "II", head, 0x1C)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", head, 0x2A)
        needed = max(phoff + phnum * phentsize, shoff + shnum * shentsize)
        if needed > size:
            return f"truncated ({size} bytes; its headers reach byte {needed})"
        f.seek(phoff)
        table = f.read(phnum * phentsize)
    # Elf64_Phdr: type, flags, offset, vaddr, paddr, filesz, ...; Elf32_Phdr: type, offset, vaddr,
    # paddr, filesz, ...
    fmt, at_offset, at_filesz = (order + "IIQQQQ", 2, 5) if wide else (order + "IIIII", 1, 4)
    if phnum and phentsize < struct.calcsize(fmt):
        return f"damaged ELF program headers ({phentsize} bytes each)"
    for i in range(phnum):
        fields = struct.unpack_from(fmt, table, i * phentsize)
        end = fields[at_offset] + fields[at_filesz]
        if end > size:
            return f"truncated ({size} bytes; segment {i} reaches byte {end})"
    return None


# ------------------------------------------------------------------ the CPU


def _v1_cpu(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """Version 1 recorded only the target; the CPU it needs follows from it where it parses."""
    try:
        return cpu_record(tvm.target.Target(json.loads(meta["target"])))
    except (KeyError, TypeError, ValueError):  # no or unparsable target: nothing to compare with
        return None


def _check_cpu(library: Path, cpu: Mapping[str, Any] | None) -> None:
    """Refuse a build that this CPU cannot run, before it is loaded (it would die with SIGILL)."""
    if cpu is None:
        return
    built = cpu.get("mcpu") or cpu.get("triple") or "its target"
    arch = cpu.get("arch")
    if arch and arch != host_arch():
        raise ArtifactError(f"{library} was built for {arch} ({built}) and this machine is {host_arch()}: "
                            "compile the model again here (engine.compile(model, 'host', x).export(dir)), "
                            f"or load the artifact on an {arch} machine")
    missing = sorted(set(cpu["features"]) - host_isa_features())
    if missing:
        raise ArtifactError(
            f"{library} was built for a CPU with {', '.join(missing)} ({built}), which this CPU "
            f"({host_cpu_name()}) lacks: running it would stop with an illegal instruction (SIGILL). "
            "Compile the model again on this machine (engine.compile(model, 'host', x).export(dir)), or "
            "load the artifact on a machine with those features")
