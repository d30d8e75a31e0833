"""Search-space primitives: a :class:`Choice` per hyper-parameter and the :class:`SearchSpace` over them.

A configuration is a plain ``dict`` from choice name to value, so it is JSON-serialisable and can
be checkpointed, logged and passed on the command line as is.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from omnic.core.errors import SearchError

Config = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One searchable hyper-parameter.

    Attributes:
        name: Unique name, ``"<kind>:<module name>"`` (e.g. ``"width:layer1.0.conv1"``).
        kind: ``"width"``, ``"kernel"``, ``"depth"`` or ``"resolution"``.
        values: Allowed values, ascending; the last one is the original model's.
        modules: The module names this choice controls (all of them share it).
    """

    name: str
    kind: str
    values: tuple[int, ...]
    modules: tuple[str, ...] = field(default_factory=tuple)

    @property
    def max(self) -> int:
        return self.values[-1]

    @property
    def min(self) -> int:
        return self.values[0]

    def normalise(self, value: Any) -> float:
        """``value`` mapped to [0, 1] of this choice's range (for predictor features)."""
        lo, hi = self.values[0], self.values[-1]
        return 1.0 if hi == lo else (float(value) - lo) / (hi - lo)


class SearchSpace:
    """An ordered set of :class:`Choice` objects.

    Args:
        choices: The choices, in model order.
    """

    def __init__(self, choices: Iterable[Choice]):
        self.choices: dict[str, Choice] = {}
        for c in choices:
            if c.name in self.choices:
                raise SearchError(f"duplicate choice name {c.name!r}")
            if not c.values:
                raise SearchError(f"choice {c.name!r} has no values")
            self.choices[c.name] = c

    def __len__(self) -> int:
        return len(self.choices)

    def __iter__(self):
        return iter(self.choices.values())

    def __getitem__(self, name: str) -> Choice:
        return self.choices[name]

    @property
    def num_subnets(self) -> int:
        """Number of distinct configurations (some may export to the same network)."""
        return math.prod(len(c.values) for c in self.choices.values())

    def max(self) -> Config:
        return {n: c.max for n, c in self.choices.items()}

    def min(self) -> Config:
        return {n: c.min for n, c in self.choices.items()}

    def sample(self, rng: random.Random | None = None) -> Config:
        rng = rng or random.Random()
        return {n: rng.choice(c.values) for n, c in self.choices.items()}

    def validate(self, cfg: Mapping[str, Any]) -> Config:
        """``cfg`` completed with the maximum of every missing choice, checked against the space.

        Raises:
            SearchError: An unknown choice name or a value the choice does not allow.
        """
        out = self.max()
        for name, value in cfg.items():
            if name not in self.choices:
                raise SearchError(f"unknown choice {name!r}; the space has: {', '.join(self.choices)}")
            if value not in self.choices[name].values:
                raise SearchError(f"{name}={value!r} is not allowed; choose one of {self.choices[name].values}")
            out[name] = value
        return out

    def key(self, cfg: Mapping[str, Any]) -> str:
        """A canonical string for ``cfg`` (used as a cache key in checkpoints)."""
        return json.dumps({n: cfg[n] for n in self.choices}, sort_keys=False, separators=(",", ":"))

    def encode(self, cfg: Mapping[str, Any]) -> list[float]:
        """Every choice normalised to [0, 1], in space order."""
        return [c.normalise(cfg[n]) for n, c in self.choices.items()]

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for c in self.choices.values():
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        return {"num_choices": len(self.choices), "num_subnets": self.num_subnets, "by_kind": kinds,
                "choices": {n: list(c.values) for n, c in self.choices.items()}}

    def __repr__(self) -> str:
        lines = [f"SearchSpace({len(self.choices)} choices, {self.num_subnets:.3g} subnets)"]
        for c in self.choices.values():
            lines.append(f"  {c.name}: {list(c.values)}")
        return "\n".join(lines)
