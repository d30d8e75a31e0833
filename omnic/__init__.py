"""omnic: compile, measure and search PyTorch models for real hardware with Apache TVM.

    import omnic
    from omnic import engine, nas
    engine.get_latency(model, {"device": "host"}, example_inputs)
"""
from __future__ import annotations

import os as _os

# TVM picks cores/2 threads on x86 when this is unset (and was measured 1.7x slower even at
# one thread); the thread pool reads it once, so it must be set before tvm is imported.
if "TVM_NUM_THREADS" not in _os.environ:
    try:
        import psutil as _psutil

        _os.environ["TVM_NUM_THREADS"] = str(_psutil.cpu_count(logical=False) or _os.cpu_count() or 1)
    except Exception:  # noqa: BLE001
        _os.environ["TVM_NUM_THREADS"] = str(_os.cpu_count() or 1)

__version__ = "0.1.0"

from omnic.deployment import Deployment  # noqa: E402
from omnic.errors import (  # noqa: E402
    ArtifactError, CompileError, DeploymentError, DeviceUnreachableError, InfeasibleConstraintError,
    InputShapeError, MeasurementError, OmnicError, PassError, SearchError, TraceError,
    UnknownDeviceError, UnsupportedOperatorError, UnsupportedPrecisionError)
from omnic.targets import DeviceSpec, get_device, known_devices  # noqa: E402
from omnic import engine  # noqa: E402
from omnic.device_model import DeviceModel, load  # noqa: E402
from omnic.ir import TracedModel, trace  # noqa: E402

__all__ = [
    "ArtifactError", "CompileError", "Deployment", "DeploymentError", "DeviceModel", "DeviceSpec",
    "DeviceUnreachableError", "InfeasibleConstraintError", "InputShapeError", "MeasurementError",
    "OmnicError", "PassError", "SearchError", "TraceError", "TracedModel", "UnknownDeviceError",
    "UnsupportedOperatorError", "UnsupportedPrecisionError", "engine", "get_device", "known_devices",
    "load", "trace", "__version__",
]
