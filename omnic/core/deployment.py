"""`Deployment`: where and how a model runs (device, precision, threads, tracker, tuning)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from omnic.core.address import parse_address
from omnic.core.errors import DeploymentError, UnsupportedPrecisionError
from omnic.core.targets import DeviceSpec, get_device


@dataclass(frozen=True, kw_only=True)
class Deployment:
    """A validated, frozen description of a deployment.

    Attributes:
        device: Device name from the device table (``omnic devices`` lists them).
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``; must be one the device supports.
        input_shape: Optional fixed input shape (overrides the example inputs' first shape).
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
            shape = tuple(int(d) for d in self.input_shape)
            if not shape or any(d <= 0 for d in shape):
                raise DeploymentError(f"input_shape must be positive integers, got {self.input_shape!r}")
            object.__setattr__(self, "input_shape", shape)
        for name in ("batch", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise DeploymentError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.tuning_trials, int) or self.tuning_trials < 0:
            raise DeploymentError(
                f"tuning_trials must be an integer >= 0 (0 = no tuning), got {self.tuning_trials!r}")
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
            if "input_shape" in kwargs and kwargs["input_shape"] is not None:
                kwargs["input_shape"] = tuple(kwargs["input_shape"])
            if kwargs.get("tuning_trials") is None:
                kwargs.pop("tuning_trials", None)
            return cls(**kwargs)
        raise DeploymentError(
            f"deployment must be an omnic.Deployment, a dict or a device name, got {type(value).__name__}")

