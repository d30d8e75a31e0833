"""`Deployment`: where and how a model runs (device, precision, threads, tracker, tuning)."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

from omnic.core.address import parse_address
from omnic.core.errors import DeploymentError, UnsupportedPrecisionError
from omnic.core.targets import DeviceSpec, get_device


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def parse_input_shape(value: Any) -> tuple[int, ...]:
    """An input shape as a tuple of positive ints.

    Accepts a tuple, list or ``torch.Size`` of ints, or the text the command line takes
    (``"1,3,224,224"`` or ``"1x3x224x224"``): a string of digits and separators can only mean a
    shape, so it is read as one rather than refused.

    Raises:
        DeploymentError: Anything else (the message shows the accepted forms).
    """
    fix = "pass a tuple of positive integers such as input_shape=(1, 3, 224, 224) (or the text \"1,3,224,224\")"
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").replace("X", ",").split(",")]
        parts = [p for p in parts if p]  # "1,3,224,224," is still a shape
        if not parts or not all(p.isdigit() for p in parts):
            raise DeploymentError(f"input_shape {value!r} is not a shape: {fix}")
        dims = [int(p) for p in parts]
    else:
        try:  # a tuple, a list, a torch.Size, a 1-d array...
            dims = list(value)
        except TypeError:
            raise DeploymentError(f"input_shape must be a tuple, got {type(value).__name__} {value!r}: {fix}") \
                from None
        if not all(_is_int(d) for d in dims):
            raise DeploymentError(f"input_shape must hold integers, got {value!r}: {fix}")
    shape = tuple(int(d) for d in dims)
    if not shape or any(d <= 0 for d in shape):
        raise DeploymentError(f"input_shape must be positive integers, got {value!r}: {fix}")
    return shape


@dataclass(frozen=True, kw_only=True)
class Deployment:
    """A validated, frozen description of a deployment.

    Attributes:
        device: Device name from the device table (``omnic devices`` lists them).
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``; must be one the device supports.
        input_shape: Optional fixed input shape (overrides the example inputs' first shape): a
            tuple of ints, or the text ``"1,3,224,224"``.
        batch: Batch size; when set, the first dimension of every example input is replaced.
        threads: Threads the compiled code uses on a CPU device (default: the device's cores).
        tracker: ``"HOST:PORT"`` of a TVM RPC tracker through which the device is reached.
        key: RPC key of the device at the tracker (defaults to the device table's key).
        tuning_trials: MetaSchedule trials to spend on new workloads; 0 turns tuning off.
        tuning_time_s: Optional wall-clock budget for tuning (tasks are tuned heaviest first).
    """

    device: str = "host"
    precision: str = "fp32"
    input_shape: tuple[int, ...] | None = None
    batch: int | None = None
    threads: int | None = None
    tracker: str | None = None
    key: str | None = None
    tuning_trials: int = 0
    tuning_time_s: float | None = None

    def __post_init__(self) -> None:
        spec = get_device(self.device)  # raises UnknownDeviceError with the known names
        if self.precision not in spec.precisions:
            raise UnsupportedPrecisionError(
                f"device {spec.name!r} does not support precision {self.precision!r}; "
                f"supported: {', '.join(spec.precisions)}")
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", parse_input_shape(self.input_shape))
        for name in ("batch", "threads"):
            value = getattr(self, name)
            # bool is an int subclass: `threads=True` is a slip, not one thread
            if value is not None and (not _is_int(value) or value <= 0):
                raise DeploymentError(f"{name} must be a positive integer, got {value!r}; "
                                      f"e.g. {name}=4, or leave it out for the default")
        if not _is_int(self.tuning_trials) or self.tuning_trials < 0:
            raise DeploymentError(
                f"tuning_trials must be an integer >= 0 (0 = no tuning), got {self.tuning_trials!r}")
        budget = self.tuning_time_s
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Real)
                                   or not math.isfinite(budget) or budget < 0):
            raise DeploymentError(
                f"tuning_time_s must be a number of seconds >= 0, got {budget!r}; "
                "e.g. tuning_time_s=600, or leave it out to tune by tuning_trials only")
        if self.tracker is not None:
            parse_address(str(self.tracker))  # text only (a tuple fails): to_dict() writes it as it is

    @property
    def spec(self) -> DeviceSpec:
        """The device table row."""
        return get_device(self.device)

    @property
    def rpc_key(self) -> str:
        """The key the device is registered under at the tracker."""
        return self.key or self.spec.rpc_key

    @property
    def tracker_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the tracker, or None."""
        return None if self.tracker is None else parse_address(self.tracker)

    @property
    def is_remote(self) -> bool:
        """True when measurements go through the RPC tracker."""
        return self.tracker is not None

    @property
    def effective_threads(self) -> int | None:
        """Threads for a CPU build (None means the device's default)."""
        return self.threads

    def replace(self, **changes: Any) -> "Deployment":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, accepted back by :meth:`coerce`."""
        d = dataclasses.asdict(self)
        if d["input_shape"] is not None:
            d["input_shape"] = list(d["input_shape"])
        return d

    @classmethod
    def coerce(cls, value: "Deployment | Mapping[str, Any] | str | None") -> "Deployment":
        """Accept a Deployment, the seed-style dict (``{"device": "S888", "precision": "int8"}``)
        or a bare device name.

        Raises:
            DeploymentError: Unknown keys or a value of the wrong type.
        """
        if value is None:
            return cls()
        if isinstance(value, Deployment):
            return value
        if isinstance(value, str):
            return cls(device=value)
        if isinstance(value, Mapping):
            fields = {f.name for f in dataclasses.fields(cls)}
            aliases = {"tuning": "tuning_trials", "trials": "tuning_trials", "num_threads": "threads"}
            kwargs = {}
            for k, v in value.items():
                k = aliases.get(k, k)
                if k not in fields:
                    raise DeploymentError(
                        f"unknown deployment field {k!r}; valid fields: {', '.join(sorted(fields))}")
                kwargs[k] = v
            if kwargs.get("tuning_trials") is None:
                kwargs.pop("tuning_trials", None)
            return cls(**kwargs)
        raise DeploymentError(
            f"deployment must be an omnic.Deployment, a dict or a device name, got {type(value).__name__}")

