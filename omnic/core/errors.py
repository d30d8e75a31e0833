"""Typed errors for everything a user can trigger.

Every error says what went wrong and what to do next. Internal invariants use ``assert``.
"""
from __future__ import annotations


class OmnicError(Exception):
    """Base class of every error omnic raises for user-triggerable problems."""


class UnknownDeviceError(OmnicError, KeyError):
    """A device name that is not in the device table."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedPrecisionError(OmnicError, ValueError):
    """A precision the chosen device does not support."""


class DeploymentError(OmnicError, ValueError):
    """A deployment with a missing or malformed field."""


class InputShapeError(OmnicError, ValueError):
    """Example inputs or call inputs whose shapes do not match what the model was compiled for."""


class TraceError(OmnicError):
    """A model that torch.fx / torch.export cannot trace."""


class UnsupportedOperatorError(OmnicError):
    """An operator the compiler cannot lower for the device."""


class CompileError(OmnicError):
    """TVM failed to build the model for the device."""


class DeviceUnreachableError(OmnicError):
    """A device that cannot be measured from here (no tracker attached, tracker down, no server)."""


class LeaseTimeoutError(DeviceUnreachableError):
    """No server under the key became free at the tracker within the allowed wait."""


class ServerConnectError(DeviceUnreachableError):
    """The tracker leased a server that cannot be connected to (gone, or not routable from here)."""


class MeasurementError(OmnicError):
    """A measurement that failed (timeout, crashed server) after all retries."""


class ArtifactError(OmnicError):
    """An exported artifact that cannot be loaded here."""


class SearchError(OmnicError):
    """A search that cannot satisfy its constraints or was misconfigured."""


class InfeasibleConstraintError(SearchError):
    """No subnet meets the constraint; carries the smallest latency found."""

    def __init__(self, message: str, *, best_latency_ms: float | None = None):
        super().__init__(message)
        self.best_latency_ms = best_latency_ms


class PassError(OmnicError):
    """An adaptation pass failed; names the pass and the passes that ran before it."""


class TuningError(OmnicError):
    """Tuning could not run (bad configuration, a database that cannot be read)."""


class QuantizationError(OmnicError):
    """int8 quantization cannot run: no usable calibration data, or an unsupported model source."""


class PredictorError(OmnicError):
    """A predictor that cannot be fitted, loaded or used (no samples, wrong schema, missing file)."""


#: How much of an underlying exception's text an omnic error quotes: TVM's messages carry whole
#: IR dumps and C++ stack traces, and the first lines say what went wrong.
DESCRIBE_LIMIT = 800


def describe(exc: BaseException, limit: int = DESCRIBE_LIMIT) -> str:
    """One line-ish text for an exception that omnic wraps: ``"TypeName: message"``, cut to ``limit``
    characters (with ``...`` where it was cut)."""
    text = str(exc)
    if len(text) > limit:
        text = text[:limit].rstrip() + " ..."
    return f"{type(exc).__name__}: {text}"


class NoServerError(DeviceUnreachableError):
    """The tracker answers, but no server is registered under the deployment's key (checked before
    any lease, so the caller learns it at once instead of after the lease timeout)."""


class CacheError(OmnicError):
    """A cache root or cache file omnic cannot use safely: it cannot be created, or others can write
    it (so whoever can write it could make omnic run their code). Names the path and the fix."""


class CacheWarning(UserWarning):
    """Something in the cache was repaired or turned off (a corrupt latency store moved aside and
    rebuilt, a read-only store whose writes are off); work goes on, and the warning says where."""


class OutputMismatchError(CompileError):
    """A compiled program whose outputs differ from PyTorch's beyond the precision's tolerance.

    Raised instead of returning (or measuring, or storing the latency of) a wrong program.

    Attributes:
        max_rel_error: ``max|actual - expected| / max|expected|`` over the outputs (``inf`` for a
            shape mismatch or NaN/inf where PyTorch is finite).
        tolerance: The precision's tolerance it exceeded.
        node: The first fx node whose output parts from PyTorch's (None where bisection could
            not localise it).
        op: That node's operator (module type or function name).
        module: That node's module path (``"<top level>"`` for free functions).
    """

    def __init__(self, message: str, *, max_rel_error: float | None = None, tolerance: float | None = None,
                 node: str | None = None, op: str | None = None, module: str | None = None):
        super().__init__(message)
        self.max_rel_error = max_rel_error
        self.tolerance = tolerance
        self.node = node
        self.op = op
        self.module = module
