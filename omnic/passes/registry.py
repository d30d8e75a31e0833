"""The registry: every pass by name, with whether it is exact and whether ``adapt`` must apply it.

One explicit table instead of registration by decorator: the pass modules import only
:mod:`omnic.passes.base`, nothing imports back, and the order below (that of
:func:`registered_passes` and of the "known passes" list in errors) does not depend on which
module happens to be imported first.
"""
from __future__ import annotations

from omnic.core.errors import PassError
from omnic.passes.base import PassInfo
from omnic.passes.channels import pad_channels, shrink_depthwise
from omnic.passes.exact import adaptive_pool_to_mean, fold_batchnorm, fuse_pointwise, remove_noops
from omnic.passes.legalize import legalize_unsupported
from omnic.passes.swaps import bilinear_to_nearest, layernorm_to_batchnorm, swap_activations

#: Every pass, device-driven ones first, then the exact ones.
PASSES: tuple[PassInfo, ...] = (
    PassInfo(name="legalize_unsupported", fn=legalize_unsupported, exact=True, required=True),
    PassInfo(name="pad_channels", fn=pad_channels, exact=True),
    PassInfo(name="swap_activations", fn=swap_activations, exact=False),
    PassInfo(name="bilinear_to_nearest", fn=bilinear_to_nearest, exact=False),
    PassInfo(name="shrink_depthwise", fn=shrink_depthwise, exact=False),
    PassInfo(name="layernorm_to_batchnorm", fn=layernorm_to_batchnorm, exact=False),
    PassInfo(name="fold_batchnorm", fn=fold_batchnorm, exact=True),
    PassInfo(name="remove_noops", fn=remove_noops, exact=True),
    PassInfo(name="fuse_pointwise", fn=fuse_pointwise, exact=True),
    PassInfo(name="adaptive_pool_to_mean", fn=adaptive_pool_to_mean, exact=True),
)

#: The order ``adapt`` tries passes in: legalisation, cheap exact clean-ups, exact layout, then the
#: approximate swaps (only with ``approximate=True``).
DEFAULT_PASSES: tuple[str, ...] = (
    "legalize_unsupported", "fold_batchnorm", "remove_noops", "fuse_pointwise", "adaptive_pool_to_mean",
    "pad_channels", "swap_activations", "bilinear_to_nearest", "shrink_depthwise", "layernorm_to_batchnorm",
)

_BY_NAME: dict[str, PassInfo] = {info.name: info for info in PASSES}


def registered_passes() -> dict[str, PassInfo]:
    """Every registered pass by name, in the order of :data:`PASSES` (a copy: edit freely)."""
    return dict(_BY_NAME)


def get_pass(name: str) -> PassInfo:
    """The registered pass called ``name``.

    Raises:
        PassError: No pass has that name (the message lists the known ones).
    """
    if name not in _BY_NAME:
        raise PassError(f"unknown pass {name!r}; known passes: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]
