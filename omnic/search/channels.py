"""FastNAS channel sorting: reorder every width group's channels by importance.

The order is changed consistently in every layer that touches a group (BatchNorm scale, or the
producing layers' weight norms, decide the importance), so the full-width output is unchanged and
every narrower width keeps the most important channels.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from omnic.search.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear


def channel_importance(omni_model: Any) -> dict[str, torch.Tensor]:
    """Per width choice, one importance value per channel (higher = keep)."""
    space = omni_model.space
    imp: dict[str, torch.Tensor] = {}
    from_bn: dict[str, bool] = {}

    def add(name: str, offset: int, size: int, values: torch.Tensor, is_bn: bool) -> None:
        values = values[offset:offset + size].detach().float()
        values = values / (values.max() + 1e-12)  # each layer gets an equal vote
        if is_bn and not from_bn.get(name):
            imp[name] = torch.zeros(size)
            from_bn[name] = True
        if is_bn or not from_bn.get(name):
            imp[name] = imp.get(name, torch.zeros(size)) + values

    for m in omni_model.elastic_modules().values():
        offset = 0
        for name, size in m.out_segments:
            if name in space.choices and space[name].kind == "width":
                if isinstance(m, ElasticBatchNorm2d) and m.affine:
                    add(name, offset, size, m.weight.abs(), True)
                elif isinstance(m, (ElasticConv2d, ElasticLinear)) and getattr(m, "groups", 1) == 1:
                    add(name, offset, size, m.weight.flatten(1).norm(dim=1), False)
            offset += size
    return imp


def _perm_for(segments, perms: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    parts, offset, any_perm = [], 0, False
    for name, size in segments:
        if name in perms:
            parts.append(perms[name] + offset)
            any_perm = True
        else:
            parts.append(torch.arange(offset, offset + size))
        offset += size
    return torch.cat(parts) if any_perm else None


@torch.no_grad()
def sort_channels(omni_model: Any) -> dict[str, list[int]]:
    """Reorder channels of every width group by importance, descending (outputs unchanged).

    Groups with grouped convs wider than one channel per group keep their order (a permutation
    across groups would change the function).

    Returns:
        The permutation applied per width choice.
    """
    groups = omni_model.groups
    perms = {name: torch.argsort(v, descending=True, stable=True)
             for name, v in channel_importance(omni_model).items()
             if groups.get(name, {}).get("granularity", 1) == 1}
    for m in omni_model.elastic_modules().values():
        out_p = _perm_for(m.out_segments, perms)
        in_p = _perm_for(m.in_segments, perms)
        if isinstance(m, ElasticBatchNorm2d):
            if out_p is None:
                continue
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None:
                    t.copy_(t[out_p])
        elif isinstance(m, (ElasticConv2d, ElasticLinear)):
            w = m.weight
            if out_p is not None:
                w.copy_(w[out_p])
                if m.bias is not None:
                    m.bias.copy_(m.bias[out_p])
            if in_p is not None and getattr(m, "groups", 1) == 1:
                w.copy_(w[:, in_p])
    return {k: v.tolist() for k, v in perms.items()}
