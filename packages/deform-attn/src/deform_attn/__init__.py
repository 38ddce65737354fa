"""Multi-scale deformable attention as a torch op (CPU and CUDA kernels, pure-PyTorch fallback).

``deform_attn.ms_deform_attn`` runs the compiled ``torch.ops.deform_attn.ms_deform_attn`` where a kernel
exists and :func:`ms_deform_attn_reference` elsewhere; :func:`build_info` says which kernels are built.
"""

from .modules import MSDeformAttn
from .ops import build_info, extension_available, kernel_available, ms_deform_attn
from .reference import ms_deform_attn_reference

__all__ = [
    "MSDeformAttn",
    "build_info",
    "extension_available",
    "kernel_available",
    "ms_deform_attn",
    "ms_deform_attn_reference",
]
