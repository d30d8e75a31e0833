"""omnic: compile, measure and search PyTorch models for real hardware with Apache TVM.

    import omnic
    from omnic import engine, nas
    engine.get_latency(model, {"device": "host"}, example_inputs)
"""
from __future__ import annotations

import importlib as _importlib
import os as _os
from typing import Any as _Any

# TVM picks cores/2 threads on x86 when this is unset (and was measured 1.7x slower even at
# one thread); the thread pool reads it once, so it must be set before tvm is imported.
if "TVM_NUM_THREADS" not in _os.environ:
    try:
        import psutil as _psutil

        _os.environ["TVM_NUM_THREADS"] = str(_psutil.cpu_count(logical=False) or _os.cpu_count() or 1)
    except Exception:  # noqa: BLE001
        _os.environ["TVM_NUM_THREADS"] = str(_os.cpu_count() or 1)

__version__ = "0.1.0"

from omnic.core.deployment import Deployment  # noqa: E402
from omnic.core.errors import (  # noqa: E402
    ArtifactError, CompileError, DeploymentError, DeviceUnreachableError, InfeasibleConstraintError,
    InputShapeError, LeaseTimeoutError, MeasurementError, OmnicError, PassError, PredictorError,
    QuantizationError, SearchError, ServerConnectError, TraceError, TuningError, UnknownDeviceError,
    UnsupportedOperatorError, UnsupportedPrecisionError, describe,
    NoServerError, CacheError, CacheWarning, OutputMismatchError)
from omnic.core.ir import TracedModel, trace  # noqa: E402
from omnic.core.targets import DeviceSpec, get_device, known_devices  # noqa: E402

# The facades and the runtime import TVM (about 3 s, since TVM imports torch's DLPack bridge):
# they load on first use, so `import omnic` and `omnic devices` stay fast.
_LAZY = {"engine": ("omnic.engine", None), "nas": ("omnic.nas", None),
         "DeviceModel": ("omnic.compile.runtime", "DeviceModel"), "load": ("omnic.compile.runtime", "load")}


def __getattr__(name: str) -> _Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'omnic' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = _importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


__all__ = [
    "ArtifactError", "CompileError", "Deployment", "DeploymentError", "DeviceModel", "DeviceSpec",
    "DeviceUnreachableError", "InfeasibleConstraintError", "InputShapeError", "LeaseTimeoutError",
    "MeasurementError", "OmnicError", "PassError", "PredictorError", "QuantizationError", "SearchError",
    "ServerConnectError", "TraceError", "TracedModel", "TuningError", "UnknownDeviceError",
    "UnsupportedOperatorError", "UnsupportedPrecisionError", "describe", "engine", "get_device",
    "known_devices", "load", "nas", "trace", "__version__",
    "NoServerError", "CacheError", "CacheWarning",
    "OutputMismatchError",
]
