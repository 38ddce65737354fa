"""``MSDeformAttn``: the multi-scale deformable attention module of Deformable DETR / DINO."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .ops import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR), parameter names as the original.

    Args:
        embed_dim: channels ``C`` of queries and values; must be divisible by ``num_heads``.
        num_levels: number of feature levels ``L``.
        num_heads: attention heads ``M``.
        num_points: sampling points ``P`` per head and level.
    """

    def __init__(self, embed_dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation: zero offset weights, offsets biased to a ring of directions
        (one per head), scaled by the point index; uniform attention; xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: ``(N, Q, C)``.
            reference_points: ``(N, Q, L, 2)`` points ``(x, y)`` or ``(N, Q, L, 4)`` boxes ``(cx, cy, w, h)``,
                normalised to ``[0, 1]``.
            value: ``(N, S, C)`` flattened multi-level input.
            spatial_shapes: ``(L, 2)`` int64 ``(H, W)`` per level.
            level_start_index: ``(L,)`` int64.
            padding_mask: ``(N, S)`` bool, True at padded positions (their values are zeroed).

        Returns:
            ``(N, Q, C)``.
        """
        n, q, _ = query.shape
        s = value.shape[1]
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        if spatial_shapes.shape[0] != lv:
            raise ValueError(f"spatial_shapes has {spatial_shapes.shape[0]} levels, the module expects {lv}")
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(n, s, m, self.embed_dim // m)
        offsets = self.sampling_offsets(query).view(n, q, m, lv, p, 2)
        weights = self.attention_weights(query).view(n, q, m, lv * p).softmax(-1).view(n, q, m, lv, p)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            # ref + offsets / normalizer, with both small operands expanded over (levels, points, xy) first:
            # a broadcast whose innermost dim is 2 runs element by element (~6x slower on CPU); same values.
            k = lv * p * 2
            norm_rep = normalizer[:, None, :].expand(lv, p, 2).reshape(k)
            ref_rep = reference_points[:, :, None, :, None, :].expand(n, q, 1, lv, p, 2).reshape(n, q, 1, k)
            # addcdiv: one pass and one buffer instead of two, same rounding as the separate div and add
            locations = torch.addcdiv(ref_rep, offsets.reshape(n, q, m, k), norm_rep).view(n, q, m, lv, p, 2)
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got shape {tuple(reference_points.shape)}"
            )
        out = ms_deform_attn(v, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)
