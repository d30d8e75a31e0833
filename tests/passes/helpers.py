"""Shared checks for pass tests: trace a pattern model, run one pass, verify purity and outputs."""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from omnic.core import ir
from omnic.passes import PassReport, get_pass
from omnic.core.targets import DeviceSpec, get_device


def spec(**overrides) -> DeviceSpec:
    """A device row for tests: the host row with some fields overridden (data, not a real device)."""
    return dataclasses.replace(get_device("host"), name="test-device", **overrides)


def snapshot(gm: fx.GraphModule) -> tuple[str, dict[str, torch.Tensor]]:
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}


def assert_unchanged(gm: fx.GraphModule, snap: tuple[str, dict[str, torch.Tensor]]) -> None:
    code, state = snap
    assert gm.code == code, "the pass mutated its input graph"
    now = gm.state_dict()
    assert now.keys() == state.keys(), "the pass added or removed parameters of its input"
    for k, v in state.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), f"the pass changed {k} of its input"


def apply(model: torch.nn.Module, x: torch.Tensor, name: str, device: DeviceSpec
          ) -> tuple[fx.GraphModule, fx.GraphModule, PassReport, torch.Tensor, torch.Tensor]:
    """Trace ``model``, run pass ``name``; checks lint and purity. Returns (before, after, report,
    reference output, new output)."""
    gm = ir.trace(model.eval(), x).gm
    snap = snapshot(gm)
    new, report = get_pass(name).fn(gm, device)
    new.graph.lint()
    assert_unchanged(gm, snap)
    assert new is not gm
    with torch.no_grad():
        return gm, new, report, gm(x), new(x)


def count(gm: fx.GraphModule, pred) -> int:
    return sum(1 for n in gm.graph.nodes if pred(gm, n))


def calls_module(kind):
    return lambda gm, n: n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind)
