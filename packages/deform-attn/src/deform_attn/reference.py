"""Pure-PyTorch multi-scale deformable attention: the reference every kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with ``F.grid_sample`` (bilinear, zeros padding, align_corners=False).

    Args:
        value: ``(N, S, M, D)`` values of all levels, flattened level after level.
        spatial_shapes: ``(L, 2)`` int64, ``(H, W)`` of each level; ``sum(H * W) == S``.
        level_start_index: ``(L,)`` int64, offset of each level in ``S`` (unused, kept for the signature).
        sampling_locations: ``(N, Q, M, L, P, 2)`` as ``(x, y)`` in ``[0, 1]`` (may lie outside).
        attention_weights: ``(N, Q, M, L, P)``.

    Returns:
        ``(N, Q, M * D)``.
    """
    n, _, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # (N, Q, M, P, 2) -> (N*M, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Q, L*P) weighted by (N*M, 1, Q, L*P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, q, num_levels * p)
    out = (stacked * weights).sum(-1).view(n, m * d, q)
    return out.transpose(1, 2).contiguous()
