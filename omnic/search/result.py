"""Search results: the subnet, its measured latency, the Pareto front and history; JSON + PNG."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points not dominated in (higher score, lower measured latency), by ascending latency."""
    pts = sorted((p for p in points if p.get("score") is not None and p.get("latency_ms") is not None),
                 key=lambda p: (p["latency_ms"], -p["score"]))
    front, best = [], float("-inf")
    for p in pts:
        if p["score"] > best:
            front.append(p)
            best = p["score"]
    return front


@dataclass(kw_only=True)
class SearchResult:
    """What :func:`omnic.nas.search` returns for one deployment.

    Attributes:
        model: The subnet as a plain ``nn.Module`` with inherited weights.
        config: Its configuration in the supernet's space.
        latency_ms: Its latency measured by the exact oracle on the device.
        score: Its score (``score_fn``).
        deployment: The deployment (as a dict).
        constraints: The constraints searched under.
        points: Every exactly measured candidate: config, score, latency_ms, feasible.
        pareto: The non-dominated points of ``points`` in (score, latency).
        history: Per-step records of the search.
        measurements: Exact measurements the search asked for (fresh or from the store).
        wall_s: Wall time of the search.
        mode: ``"autonas"``, ``"random"`` or ``"fastnas"``.
        cost: Params, FLOPs and memory estimate of the subnet.
        scores: Extra scores (FastNAS: full model, before/after fine-tuning).
        info: Extra facts (e.g. whether a FastNAS sensitivity map was reused).
    """

    model: nn.Module
    config: dict[str, Any]
    latency_ms: float
    score: float
    deployment: dict[str, Any]
    constraints: dict[str, Any]
    points: list[dict[str, Any]] = field(default_factory=list)
    pareto: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    measurements: int = 0
    wall_s: float = 0.0
    mode: str = "autonas"
    cost: dict[str, float] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "latency_ms": self.latency_ms, "score": self.score,
                "deployment": self.deployment, "constraints": self.constraints, "mode": self.mode,
                "cost": self.cost, "scores": self.scores, "info": self.info, "measurements": self.measurements,
                "wall_s": self.wall_s, "pareto": self.pareto, "points": self.points, "history": self.history}

    def save(self, directory: str | Path, *, name: str = "search") -> dict[str, Path]:
        """Write ``<name>.json``, ``<name>_pareto.png`` and the subnet's ``<name>_model.pt``."""
        import torch

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {"json": d / f"{name}.json", "png": d / f"{name}_pareto.png", "model": d / f"{name}_model.pt"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=float))
        plot_pareto([self], paths["png"])
        torch.save(self.model, paths["model"])
        return paths


class MultiSearchResult(dict):
    """One :class:`SearchResult` per device (``results["host"]``), from a multi-deployment search."""

    def save(self, directory: str | Path) -> dict[str, dict[str, Path]]:
        d = Path(directory)
        out = {dev: r.save(d, name=f"search_{dev}") for dev, r in self.items()}
        plot_pareto(list(self.values()), d / "pareto_all.png")
        return out


def plot_pareto(results: list[SearchResult], path: str | Path, *, labels: list[str] | None = None,
                title: str | None = None) -> Path:
    """Scatter every verified point and the Pareto front of each result; mark the chosen subnet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for i, r in enumerate(results):
        label = labels[i] if labels else f"{r.mode} on {r.deployment.get('device', '?')}"
        pts = [p for p in r.points if p.get("score") is not None and p.get("latency_ms") is not None]
        line = ax.scatter([p["latency_ms"] for p in pts], [p["score"] for p in pts], s=14, alpha=0.5,
                          label=f"{label}: verified points")
        front = r.pareto or pareto_front(r.points)
        ax.step([p["latency_ms"] for p in front], [p["score"] for p in front], where="post",
                color=line.get_facecolor()[0], alpha=0.9)
        ax.scatter([r.latency_ms], [r.score], marker="*", s=140, color=line.get_facecolor()[0],
                   edgecolor="black", label=f"{label}: result")
        budget = r.constraints.get("latency")
        if budget:
            ax.axvline(budget, linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("score")
    ax.set_title(title or "Pareto front (score vs measured latency)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
