"""int8 post-training quantization.

The flow (``engine.compile(model, {"precision": "int8"}, x, calibration=batches)``):

1. :mod:`~omnic.compile.quant.calibrate` observes each conv2d / linear input on the fx graph (no TVM).
2. :mod:`~omnic.compile.quant.rewrite` turns conv2d / matmul into integer kernels in Relax.
3. :mod:`~omnic.compile.quant.packing` (CPU, after the NHWC layout conversion) packs the int8
   convs' weights for the device's dot-product instruction (x86 VNNI, AArch64 sdot).
4. :mod:`~omnic.compile.quant.intrinsics` fixes MetaSchedule's VNNI intrinsic for the bundled LLVM,
   registered only where int8 kernels are tuned or replayed on a VNNI CPU.
"""
from omnic.compile.quant.calibrate import (CALIBRATION_METHODS, DEPTHWISE_CHOICES, Calibration, LayerStats,
                                           QuantConfig, calibrate)
from omnic.compile.quant.intrinsics import register_vnni_intrinsic
from omnic.compile.quant.packing import (DOT_PRODUCT_PACKINGS, PACKED_BLOCK, VNNI_BLOCK, DotProductPacking,
                                         pack_dot_product, pack_vnni, strip_layout_free)
from omnic.compile.quant.rewrite import (ONNX_QDQ, UNCALIBRATED_SCALE, accuracy_vs_fp32, ops_precision,
                                         quantize_relax, quantize_weight, require_onnx_qdq)
from omnic.core.ir import fused_graph

__all__ = [
    "CALIBRATION_METHODS", "DEPTHWISE_CHOICES", "DOT_PRODUCT_PACKINGS", "ONNX_QDQ", "PACKED_BLOCK",
    "UNCALIBRATED_SCALE", "VNNI_BLOCK", "Calibration", "DotProductPacking", "LayerStats", "QuantConfig",
    "accuracy_vs_fp32", "calibrate", "fused_graph", "ops_precision", "pack_dot_product", "pack_vnni",
    "quantize_relax", "quantize_weight", "register_vnni_intrinsic", "require_onnx_qdq", "strip_layout_free",
]
