"""The default schedule as every task's baseline: timed once with the tuner's own builder and
runner, so that a tuned record is used only where it beats it.

The default CPU rules (:mod:`omnic.compile.rules.cpu`) often beat what a short search finds: a
few dozen trials of MetaSchedule's design space land on schedules slower than the rule's. The
tuner's records are measured on this device; so is the default schedule, here, under the same
conditions, and its time goes into the ledger (``default_ms``, with the rules' revision). A
build then keeps the default schedule of a kernel whose best record is not faster
(:func:`omnic.compile.tuning.replay.apply_database`), and transfer-tuning does not copy a
workload whose tuning never beat its default. So tuning never makes a build slower than the
untuned build, and a short budget is never a loss.

The default schedules are not committed as records: several of them rewrite the kernel
directly (fast math), which a MetaSchedule trace cannot replay.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import find_anchor_sblock

from omnic.compile.rules.cpu import DEFAULT_RULES, RULES_REVISION, apply_default_schedules
from omnic.compile.tuning.database import run_ms
from omnic.compile.tuning.ledger import LEDGER, read_ledger


def anchor_key(mod: tvm.IRModule) -> str:
    """The ledger's key of a kernel: the hash of its anchor op (the database's equality)."""
    anchor = find_anchor_sblock(mod)
    return str(tvm_ffi.structural_hash(anchor if anchor is not None else mod))


def default_ms(entry: dict[str, Any] | None) -> float | None:
    """A ledger entry's default-schedule time, when it was measured with the current rules."""
    if not entry or entry.get("rules") != RULES_REVISION:
        return None
    value = entry.get("default_ms")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def baselines(folder: Path | None) -> dict[str, float]:
    """``{anchor key: default ms}`` of the database in ``folder`` (current rules only)."""
    if folder is None:
        return {}
    ledger = read_ledger(Path(folder) / LEDGER)
    return {key: ms_ for key, entry in ledger["tasks"].items() if (ms_ := default_ms(entry)) is not None}


def measure_defaults(kernels: Sequence[tuple[str, tvm.IRModule]], target: tvm.target.Target,
                     builder: ms.builder.Builder, runner: ms.runner.Runner,
                     rules: Sequence[Any] = DEFAULT_RULES) -> dict[str, float]:
    """Milliseconds of each kernel's default schedule, built and run as the tuner's candidates are.

    Args:
        kernels: ``(key, kernel module)`` pairs (a task's key and its dispatched module).
        target: The CPU target.
        builder: The tuning run's builder.
        runner: The tuning run's runner (local or RPC).
        rules: The default rules.

    Returns:
        ``{key: ms}`` for the kernels a rule schedules and that build and run; the others are
        left out (their records are then used as they are).
    """
    keys, inputs = [], []
    for key, mod in kernels:
        gv = mod.get_global_var("main")
        try:
            scheduled, outcomes = apply_default_schedules(tvm.IRModule({gv: mod[gv]}), target, rules)
        except Exception:  # noqa: BLE001 - a kernel no rule schedules has no baseline
            continue
        if not outcomes or outcomes[0].rule is None:
            continue
        keys.append(key)
        inputs.append(scheduled)
    if not inputs:
        return {}
    built = builder.build([ms.builder.BuilderInput(m, target) for m in inputs])
    runs, run_keys = [], []
    device_type = "cpu" if str(target.kind.name) == "llvm" else str(target.kind.name)
    for key, mod, result in zip(keys, inputs, built):
        if result.error_msg is None:
            args = ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)
            runs.append(ms.runner.RunnerInput(result.artifact_path, device_type, args))
            run_keys.append(key)
    out: dict[str, float] = {}
    try:
        for key, future in zip(run_keys, runner.run(runs) if runs else []):
            result = future.result()
            ms_ = run_ms(result.run_secs) if result.error_msg is None else None
            if ms_ is not None:
                out[key] = ms_
    finally:
        for result in built:
            if result.artifact_path:  # as MetaSchedule's RemoveBuildArtifact callback does
                shutil.rmtree(Path(result.artifact_path).parent, ignore_errors=True)
    return out


def record_defaults(ledger: dict[str, Any], measured: dict[str, float], names: dict[str, str]) -> None:
    """Write measured default times into the ledger's task entries."""
    for key, value in measured.items():
        entry = ledger["tasks"].setdefault(key, {"name": names.get(key, key), "trials": 0, "complete": False})
        entry.update(default_ms=round(value, 6), rules=RULES_REVISION)
