"""Elastic modules: built at the maximum size, they run (and export) a slice of their weights.

Each elastic module subclasses the ``torch.nn`` module it replaces, so its parameters and
buffers keep their names and a user's ``state_dict`` loads into the supernet unchanged. Channels
are selected Once-for-All style: the first ``n`` channels of each *segment* of the module's
input/output. A segment is one channel group; a tensor made by ``torch.cat`` has several, so a
consumer of a concatenation gathers ``[0, a1) + [C1, C1 + a2) + ...`` instead of a prefix.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# (choice name or None for a fixed width, full number of channels)
Segments = tuple[tuple[str | None, int], ...]
# None: all channels; int n: the first n; tensor: gathered channel indices
Index = Any


def segment_index(segments: Segments, cfg: Mapping[str, Any]) -> tuple[int, Index]:
    """Active channel count and index of a tensor made of ``segments`` under ``cfg``."""
    full = sum(size for _, size in segments)
    active = [min(int(cfg.get(name, size)) if name else size, size) for name, size in segments]
    n = sum(active)
    if n == full:
        return n, None
    if len(segments) == 1 or all(a == s for a, (_, s) in zip(active[:-1], segments[:-1])):
        return n, n  # a prefix: slicing gives views, which BN statistics updates need
    parts, offset = [], 0
    for a, (_, size) in zip(active, segments):
        parts.append(torch.arange(offset, offset + a))
        offset += size
    return n, torch.cat(parts)


def take(t: torch.Tensor, dim: int, idx: Index) -> torch.Tensor:
    """``t`` restricted to ``idx`` along ``dim`` (a view for None / prefix indices)."""
    if idx is None:
        return t
    if isinstance(idx, int):
        return t.narrow(dim, 0, idx)
    return t.index_select(dim, idx.to(t.device))


class ElasticMixin:
    """Shared state of elastic modules: input/output segments and the active slice."""

    in_segments: Segments
    out_segments: Segments

    @classmethod
    def _adopt(cls, m: nn.Module):
        """A new elastic module sharing ``m``'s parameters and buffers (no copy, no re-init), so
        the supernet trains the user's weights in place."""
        new = cls.__new__(cls)
        new.__dict__ = m.__dict__.copy()
        new._parameters = dict(m._parameters)
        new._buffers = dict(m._buffers)
        new._modules = dict(m._modules)
        return new

    def _init_elastic(self, in_segments: Segments, out_segments: Segments) -> None:
        self.in_segments = tuple(in_segments)
        self.out_segments = tuple(out_segments)
        self.in_idx: Index = None
        self.out_idx: Index = None
        self.active_in = sum(s for _, s in self.in_segments)
        self.active_out = sum(s for _, s in self.out_segments)

    def set_active(self, cfg: Mapping[str, Any]) -> None:
        self.active_in, self.in_idx = segment_index(self.in_segments, cfg)
        self.active_out, self.out_idx = segment_index(self.out_segments, cfg)


class ElasticConv2d(ElasticMixin, nn.Conv2d):
    """A ``Conv2d`` with elastic input/output width and kernel size (centre-cropped weights).

    Grouped (incl. depthwise) convs keep the channels per group fixed and drop whole groups; the
    converter ties their input and output to the same channel groups so that is always valid.
    """

    @classmethod
    def from_module(cls, m: nn.Conv2d, in_segments: Segments, out_segments: Segments,
                    kernel_choice: str | None = None) -> "ElasticConv2d":
        new = cls._adopt(m)
        new._init_elastic(in_segments, out_segments)
        new.kernel_choice = kernel_choice
        new.active_kernel = m.kernel_size[0]
        return new

    def set_active(self, cfg: Mapping[str, Any]) -> None:
        super().set_active(cfg)
        k = self.kernel_size[0]
        self.active_kernel = int(cfg.get(self.kernel_choice, k)) if self.kernel_choice else k

    def active_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """(weight, bias, padding, groups) of the active slice."""
        w = take(self.weight, 0, self.out_idx)
        if self.groups == 1:
            w = take(w, 1, self.in_idx)
            groups = 1
        else:
            groups = self.active_out // (self.out_channels // self.groups)
        k, ak = self.kernel_size[0], self.active_kernel
        padding = self.padding
        if ak < k:
            off = (k - ak) // 2
            w = w[:, :, off:off + ak, off:off + ak]
            padding = (ak // 2, ak // 2)
        b = take(self.bias, 0, self.out_idx) if self.bias is not None else None
        return w, b, padding, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, padding, groups = self.active_weights()
        return F.conv2d(x, w, b, self.stride, padding, self.dilation, groups)

    def export(self) -> nn.Conv2d:
        w, b, padding, groups = self.active_weights()
        m = nn.Conv2d(self.active_in, self.active_out, self.active_kernel, self.stride, padding,
                      self.dilation, groups, bias=b is not None, padding_mode=self.padding_mode)
        with torch.no_grad():
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
        return m.train(self.training)

    def active_macs(self, out_hw: int) -> int:
        ak = self.active_kernel
        groups = 1 if self.groups == 1 else self.active_out // (self.out_channels // self.groups)
        return self.active_out * (self.active_in // groups) * ak * ak * out_hw

    def active_params(self) -> int:
        groups = 1 if self.groups == 1 else self.active_out // (self.out_channels // self.groups)
        n = self.active_out * (self.active_in // groups) * self.active_kernel ** 2
        return n + (self.active_out if self.bias is not None else 0)


class ElasticBatchNorm2d(ElasticMixin, nn.BatchNorm2d):
    """A ``BatchNorm2d`` over the active channels (running statistics are sliced in place)."""

    @classmethod
    def from_module(cls, m: nn.BatchNorm2d, segments: Segments) -> "ElasticBatchNorm2d":
        new = cls._adopt(m)
        new._init_elastic(segments, segments)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.out_idx
        weight = take(self.weight, 0, idx) if self.weight is not None else None
        bias = take(self.bias, 0, idx) if self.bias is not None else None
        use_batch = self.training or self.running_mean is None
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            # momentum None means a cumulative average: what BN recalibration uses
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        rm = take(self.running_mean, 0, idx) if self.running_mean is not None else None
        rv = take(self.running_var, 0, idx) if self.running_var is not None else None
        out = F.batch_norm(x, rm, rv, weight, bias, use_batch, factor, self.eps)
        if self.training and rm is not None and isinstance(idx, torch.Tensor):
            with torch.no_grad():  # gathered copies: write the updated statistics back
                self.running_mean[idx] = rm
                self.running_var[idx] = rv
        return out

    def export(self) -> nn.BatchNorm2d:
        idx = self.out_idx
        m = nn.BatchNorm2d(self.active_out, self.eps, self.momentum, self.affine, self.track_running_stats)
        with torch.no_grad():
            if self.affine:
                m.weight.copy_(take(self.weight, 0, idx))
                m.bias.copy_(take(self.bias, 0, idx))
            if self.track_running_stats:
                m.running_mean.copy_(take(self.running_mean, 0, idx))
                m.running_var.copy_(take(self.running_var, 0, idx))
                m.num_batches_tracked.copy_(self.num_batches_tracked)
        return m.train(self.training)

    def active_params(self) -> int:
        return 2 * self.active_out if self.affine else 0


class ElasticLinear(ElasticMixin, nn.Linear):
    """A ``Linear`` with elastic input (and, for hidden layers, output) features."""

    @classmethod
    def from_module(cls, m: nn.Linear, in_segments: Segments, out_segments: Segments) -> "ElasticLinear":
        new = cls._adopt(m)
        new._init_elastic(in_segments, out_segments)
        return new

    def active_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = take(take(self.weight, 0, self.out_idx), 1, self.in_idx)
        b = take(self.bias, 0, self.out_idx) if self.bias is not None else None
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.active_weights()
        return F.linear(x, w, b)

    def export(self) -> nn.Linear:
        w, b = self.active_weights()
        m = nn.Linear(self.active_in, self.active_out, bias=b is not None)
        with torch.no_grad():
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
        return m.train(self.training)

    def active_macs(self, out_hw: int = 1) -> int:
        return self.active_in * self.active_out * out_hw

    def active_params(self) -> int:
        return self.active_in * self.active_out + (self.active_out if self.bias is not None else 0)


class DepthGate(nn.Module):
    """Wraps a shape-preserving residual block; when inactive the block is skipped (identity)."""

    def __init__(self, block: nn.Module, choice: str, position: int):
        super().__init__()
        self.block = block
        self.choice = choice
        self.position = position  # the block runs when the stage's depth choice > position
        self.active = True

    def set_active(self, cfg: Mapping[str, Any]) -> None:
        self.active = int(cfg.get(self.choice, self.position + 1)) > self.position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) if self.active else x

    def export(self) -> nn.Module:
        """The plain block (sliced) when active, else ``nn.Identity``."""
        return export_module(self)


ELASTIC_TYPES = (ElasticConv2d, ElasticBatchNorm2d, ElasticLinear)


def export_module(module: nn.Module) -> nn.Module:
    """A plain copy of ``module`` for the active configuration (elastic parts sliced, gates resolved)."""
    if isinstance(module, ELASTIC_TYPES):
        return module.export()
    if isinstance(module, DepthGate):
        return export_module(module.block) if module.active else nn.Identity()
    import copy

    clone = copy.copy(module)
    clone._parameters = {k: (None if v is None else nn.Parameter(v.detach().clone(), v.requires_grad))
                         for k, v in module._parameters.items()}
    clone._buffers = {k: (None if v is None else v.detach().clone()) for k, v in module._buffers.items()}
    clone._modules = {k: (None if v is None else export_module(v)) for k, v in module._modules.items()}
    clone.__dict__ = {k: v for k, v in clone.__dict__.items()}
    # hooks of the supernet are not part of the exported model
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
        if hasattr(clone, attr):
            setattr(clone, attr, type(getattr(module, attr))())
    return clone


def set_active(modules: Sequence[nn.Module], cfg: Mapping[str, Any]) -> None:
    for m in modules:
        m.set_active(cfg)
