"""Hardware adaptation passes: pure ``(GraphModule, DeviceSpec) -> (GraphModule, PassReport)``
rewrites, a runner, and :func:`omnic.passes.adapt.adapt`, which keeps a rewrite only where the
latency oracle measures that it helps on the device.

Layout: :mod:`~omnic.passes.base` (the framework), one module per family of passes
(:mod:`~omnic.passes.legalize`, :mod:`~omnic.passes.channels`, :mod:`~omnic.passes.swaps`,
:mod:`~omnic.passes.exact`), :mod:`~omnic.passes.registry` (the table of passes by name) and
:mod:`~omnic.passes.runner`. ``adapt`` is not imported here: it needs the oracle and compiler,
the passes themselves need only torch.
"""
from omnic.passes.base import PassInfo, PassReport
from omnic.passes.channels import pad_channels, shrink_depthwise
from omnic.passes.exact import adaptive_pool_to_mean, fold_batchnorm, fuse_pointwise, remove_noops
from omnic.passes.legalize import legalize_unsupported
from omnic.passes.registry import DEFAULT_PASSES, get_pass, registered_passes
from omnic.passes.runner import PassRun, run_passes
from omnic.passes.swaps import bilinear_to_nearest, layernorm_to_batchnorm, swap_activations

__all__ = ["DEFAULT_PASSES", "PassInfo", "PassReport", "PassRun", "get_pass", "registered_passes", "run_passes",
           "adaptive_pool_to_mean", "bilinear_to_nearest", "fold_batchnorm", "fuse_pointwise",
           "layernorm_to_batchnorm", "legalize_unsupported", "pad_channels", "remove_noops",
           "shrink_depthwise", "swap_activations"]
