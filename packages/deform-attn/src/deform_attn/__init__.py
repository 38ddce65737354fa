"""Multi-scale deformable attention as a torch op (CPU and CUDA kernels, pure-PyTorch fallback).

``deform_attn.ms_deform_attn`` runs the compiled ``torch.ops.deform_attn.ms_deform_attn`` where a kernel
exists and :func:`ms_deform_attn_reference` elsewhere; :func:`build_info` says which kernels are built and
which CPU kernel copy runs (:func:`cpu_isa`, :func:`set_cpu_isa`). ``deform_attn.onnx`` (imported on demand,
needs onnxscript) translates the op into standard ONNX operators for ``torch.onnx.export``.
"""

from .modules import MSDeformAttn
from .ops import (
    build_info,
    cpu_isa,
    cpu_isas_supported,
    extension_available,
    kernel_available,
    ms_deform_attn,
    set_cpu_isa,
)
from .reference import ms_deform_attn_reference

__all__ = [
    "MSDeformAttn",
    "build_info",
    "cpu_isa",
    "cpu_isas_supported",
    "extension_available",
    "kernel_available",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "set_cpu_isa",
]
