"""Dispatch of ``ms_deform_attn`` to the compiled kernels, with the pure-PyTorch path as fallback.

The compiled extension (``deform_attn._C``) registers ``deform_attn::ms_deform_attn`` with torch; this
module adds input validation. (Owned by the deform-attn kernel work: replace freely.)
"""

from __future__ import annotations

from torch import Tensor

from .reference import ms_deform_attn_reference


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    im2col_step: int = 64,
) -> Tensor:
    """Multi-scale deformable attention. Shapes as :func:`ms_deform_attn_reference`; returns ``(N, Q, M*D)``."""
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
