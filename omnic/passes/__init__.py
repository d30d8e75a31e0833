"""Hardware adaptation passes: pure ``(GraphModule, DeviceSpec) -> (GraphModule, PassReport)``
rewrites, a runner, and :func:`omnic.passes.adapt.adapt`, which keeps a rewrite only where the
latency oracle measures that it helps on the device.
"""
from omnic.passes.base import PassInfo, PassReport, PassRun, get_pass, registered_passes, run_passes
from omnic.passes.device import (bilinear_to_nearest, layernorm_to_batchnorm, legalize_unsupported,
                                 pad_channels, shrink_depthwise, swap_activations)
from omnic.passes.exact import adaptive_pool_to_mean, fold_batchnorm, fuse_pointwise, remove_noops

#: The order ``adapt`` tries passes in: legalisation, cheap exact clean-ups, exact layout, then the
#: approximate swaps (only with ``approximate=True``).
DEFAULT_PASSES: tuple[str, ...] = (
    "legalize_unsupported", "fold_batchnorm", "remove_noops", "fuse_pointwise", "adaptive_pool_to_mean",
    "pad_channels", "swap_activations", "bilinear_to_nearest", "shrink_depthwise", "layernorm_to_batchnorm",
)

__all__ = ["DEFAULT_PASSES", "PassInfo", "PassReport", "PassRun", "get_pass", "registered_passes", "run_passes",
           "adaptive_pool_to_mean", "bilinear_to_nearest", "fold_batchnorm", "fuse_pointwise",
           "layernorm_to_batchnorm", "legalize_unsupported", "pad_channels", "remove_noops",
           "shrink_depthwise", "swap_activations"]
