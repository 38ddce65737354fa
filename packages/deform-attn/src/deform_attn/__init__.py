"""Multi-scale deformable attention as a torch op (CPU and CUDA kernels, pure-PyTorch fallback)."""

from .modules import MSDeformAttn
from .ops import ms_deform_attn
from .reference import ms_deform_attn_reference

__all__ = ["MSDeformAttn", "build_info", "ms_deform_attn", "ms_deform_attn_reference"]


def build_info() -> str:
    """One line saying which kernels this install has."""
    return "deform_attn: pure-PyTorch path only (kernels not built yet)"
