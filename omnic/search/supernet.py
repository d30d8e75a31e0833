"""`OmniModel`: an elastic supernet that is still an ``nn.Module``.

It wraps a copy of the user's model whose ``Conv2d`` / ``BatchNorm2d`` / ``Linear`` layers were
swapped for elastic ones and whose skippable residual blocks sit behind :class:`DepthGate`s. The
active configuration decides which slice runs; :meth:`OmniModel.export` turns it into a plain
module of the user's own classes with the sliced weights.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from omnic.search.elastic import DepthGate, ElasticBatchNorm2d, ElasticConv2d, ElasticLinear, export_module
from omnic.search.space import Config, SearchSpace


class OmniModel(nn.Module):
    """An elastic supernet over a user's model.

    Attributes:
        model: The user's model with elastic layers (parameter names unchanged except that
            skippable blocks gain a ``.block`` level).
        space: The :class:`SearchSpace` (``print(omni_model.space)`` lists it).
        mode: ``"autonas"`` or ``"fastnas"``.
        example_inputs: The inputs the model was converted with (at the maximum resolution).
    """

    def __init__(self, model: nn.Module, space: SearchSpace, *, mode: str,
                 example_inputs: tuple[torch.Tensor, ...], elastic: dict[str, nn.Module],
                 gates: dict[str, DepthGate], spatial: dict[int, dict[str, int]],
                 groups: dict[str, dict[str, Any]], base_resolution: int | None):
        super().__init__()
        self.model = model
        self.space = space
        self.mode = mode
        self.example_inputs = example_inputs
        # plain dicts (not ModuleDicts) so the modules are registered once, under self.model
        self.__dict__["_elastic"] = elastic
        self.__dict__["_gates"] = gates
        self._spatial = spatial
        self.groups = groups
        self.base_resolution = base_resolution
        self.active_config: Config = space.max()
        self.set_active(self.active_config)

    # ---------------------------------------------------------------------------- configurations
    def max(self) -> Config:
        """The largest configuration (the original model)."""
        return self.space.max()

    def min(self) -> Config:
        """The smallest configuration."""
        return self.space.min()

    def sample(self, rng: random.Random | int | None = None) -> Config:
        """A uniformly random configuration (``rng`` may be a seed)."""
        if isinstance(rng, int):
            rng = random.Random(rng)
        return self.space.sample(rng)

    def set_active(self, cfg: Mapping[str, Any]) -> Config:
        """Make ``cfg`` (missing choices default to their maximum) the subnet that runs.

        Raises:
            SearchError: Unknown choice or disallowed value.
        """
        full = self.space.validate(cfg)
        for m in self._elastic.values():
            m.set_active(full)
        for g in self._gates.values():
            g.set_active(full)
        self.active_config = full
        return full

    def canonical(self, cfg: Mapping[str, Any]) -> Config:
        """``cfg`` with every choice that only controls skipped blocks set to its maximum, so
        configurations that export to the same network compare (and cache) equal."""
        full = self.space.validate(cfg)
        skipped = [name for name, g in self._gates.items()
                   if int(full.get(g.choice, g.position + 1)) <= g.position]
        if not skipped:
            return full
        for name, choice in self.space.choices.items():
            if choice.kind in ("width", "kernel") and choice.modules and all(
                    any(m == s or m.startswith(s + ".") for s in skipped) for m in choice.modules):
                full[name] = choice.max
        return full

    @contextlib.contextmanager
    def active(self, cfg: Mapping[str, Any]) -> Iterator[Config]:
        """Context manager: ``cfg`` is active inside, the previous configuration after."""
        previous = dict(self.active_config)
        try:
            yield self.set_active(cfg)
        finally:
            self.set_active(previous)

    @property
    def resolution(self) -> int | None:
        """The active input resolution (None when resolution is not part of the space)."""
        if "resolution" in self.space.choices:
            return int(self.active_config["resolution"])
        return self.base_resolution

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "resolution" in self.space.choices and args and isinstance(args[0], torch.Tensor):
            res = int(self.active_config["resolution"])
            x = args[0]
            if x.dim() == 4 and tuple(x.shape[-2:]) != (res, res):
                # resizing here lets a user's evaluation loop score any resolution unchanged
                args = (F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False),) + args[1:]
        return self.model(*args, **kwargs)

    # ---------------------------------------------------------------------------- export and cost
    def export(self, cfg: Mapping[str, Any] | None = None) -> nn.Module:
        """A plain ``nn.Module`` (the user's classes, plain layers, sliced weights) for ``cfg``.

        Its output on an input at the configuration's resolution equals this supernet's output
        with ``cfg`` active. Without ``cfg`` the active configuration is exported.
        """
        with self.active(cfg if cfg is not None else self.active_config):
            out = export_module(self.model)
        return out.train(self.training)

    def example_input(self, cfg: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, ...]:
        """The example inputs resized to ``cfg``'s resolution (what the exported model takes)."""
        cfg = self.space.validate(cfg or self.active_config)
        x = self.example_inputs
        if "resolution" in cfg and x and x[0].dim() == 4:
            res = int(cfg["resolution"])
            if tuple(x[0].shape[-2:]) != (res, res):
                first = F.interpolate(x[0], size=(res, res), mode="bilinear", align_corners=False)
                x = (first,) + tuple(x[1:])
        return tuple(x)

    def cost(self, cfg: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Exact params and FLOPs (2 x multiply-accumulates of convs and linears) of ``cfg``, and
        a memory estimate in MB (fp32 weights plus the largest conv input+output activation)."""
        cfg = self.space.validate(cfg if cfg is not None else self.active_config)
        res = int(cfg.get("resolution", self.base_resolution or 0))
        spatial = self._spatial.get(res) or next(iter(self._spatial.values()))
        with self.active(cfg):
            params = 0
            macs = 0
            peak_act = 0
            for name, m in self._walk(self.model, ""):
                if isinstance(m, ElasticConv2d):
                    hw = spatial.get(name, 1)
                    macs += m.active_macs(hw)
                    params += m.active_params()
                    peak_act = max(peak_act, m.active_out * hw + m.active_in * spatial.get(name + "#in", hw))
                elif isinstance(m, ElasticLinear):
                    macs += m.active_macs(spatial.get(name, 1))
                    params += m.active_params()
                elif isinstance(m, ElasticBatchNorm2d):
                    params += m.active_params()
                else:
                    params += sum(p.numel() for p in m.parameters(recurse=False))
        return {"params": float(params), "flops": float(2 * macs),
                "memory": float((params + peak_act) * 4 / 1e6)}

    def _walk(self, module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        """Modules of the active subnet, named as in the user's model (gates are transparent)."""
        if isinstance(module, DepthGate):
            if module.active:
                yield from self._walk(module.block, prefix)
            return
        yield prefix, module
        for name, child in module._modules.items():
            if child is not None:
                yield from self._walk(child, f"{prefix}.{name}" if prefix else name)

    def elastic_modules(self) -> dict[str, nn.Module]:
        """Elastic layers by their name in the user's model."""
        return dict(self._elastic)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, choices={len(self.space)}, subnets={self.space.num_subnets}"
