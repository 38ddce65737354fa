"""Deformable transformer encoder (Deformable DETR / DINO / Mask DINO pixel decoder), batch-first.

Token layout: the ``L`` feature levels are flattened row-major and concatenated, so ``S = sum_l H_l * W_l``;
``spatial_shapes (L, 2)`` int64 holds ``(H_l, W_l)`` and ``level_start_index (L,)`` the offset of each level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deform_attn import MSDeformAttn

from .box_ops import valid_ratios as mask_valid_ratios
from .layers import clone_modules, get_activation_fn, post_norm_ffn

__all__ = [
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "FlatLevels",
    "flatten_levels",
    "level_start_index",
    "shapes_as_list",
]


def shapes_as_list(spatial_shapes: Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """``(L, 2)`` tensor or sequence of ``(H, W)`` -> list of ``(H, W)``: Python ints, or the symbolic sizes of a
    ``torch.export`` trace as they are (``int()`` would specialise them)."""
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def level_start_index(spatial_shapes: Tensor) -> Tensor:
    """``(L, 2)`` int64 ``(H, W)`` -> ``(L,)`` int64 start offset of each level in the flattened tokens."""
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


@dataclass
class FlatLevels:
    """``L`` feature maps flattened into one token sequence (see :func:`flatten_levels`).

    Attributes:
        tokens: ``(B, S, C)``. padding_mask: ``(B, S)`` bool True=pad, or None.
        spatial_shapes: ``(L, 2)`` int64 ``(H, W)``. level_start_index: ``(L,)`` int64.
        valid_ratios: ``(B, L, 2)`` ``(w_ratio, h_ratio)`` (ones without padding masks).
        shapes: the same ``(H, W)`` as Python ints (static under ``torch.export``).
    """

    tokens: Tensor
    padding_mask: Tensor | None
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    shapes: list[tuple[int, int]]


def flatten_levels(maps: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None) -> FlatLevels:
    """Flatten multi-level maps row-major and concatenate them in the given order (Deformable DETR's input layout).

    The shapes and start offsets are built from the maps' static sizes, not read back from tensors, so the result
    traces and exports without data-dependent values.

    Args:
        maps: ``L`` maps ``(B, C, H_l, W_l)``.
        masks: ``L`` padding masks ``(B, H_l, W_l)`` bool True=pad, or None (also when every entry is None).

    Returns:
        :class:`FlatLevels`.
    """
    if masks is not None and all(m is None for m in masks):
        masks = None
    if masks is not None and (len(masks) != len(maps) or any(m is None for m in masks)):
        raise ValueError("masks must be None or one padding mask per level")
    # the maps' sizes as they are: Python ints in eager mode, symbolic sizes under torch.export (never int(): that
    # would specialise a dynamic export to the traced size)
    shapes = [(x.shape[-2], x.shape[-1]) for x in maps]
    tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in maps], 1)
    device = tokens.device
    areas = [h * w for h, w in shapes]
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    starts = torch.tensor([sum(areas[:i]) for i in range(len(areas))], dtype=torch.long, device=device)
    if masks is None:
        padding_mask = None
        ratios = tokens.new_ones(tokens.shape[0], len(maps), 2)
    else:
        given = [m for m in masks if m is not None]
        padding_mask = torch.cat([m.flatten(1) for m in given], 1)
        ratios = torch.stack([mask_valid_ratios(m) for m in given], 1)
    return FlatLevels(tokens, padding_mask, spatial_shapes, starts, ratios, shapes)


class DeformableEncoderLayer(nn.Module):
    """One post-norm encoder layer: ``src = norm1(src + MSDA(src + pos, ref, src))``,
    ``src = norm2(src + linear2(act(linear1(src))))``.

    Args:
        d_model: channels ``C``. d_ffn: FFN hidden size. dropout: dropout probability. activation: FFN activation.
        n_levels, n_heads, n_points: of the deformable self-attention.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = get_activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor | None,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            src: ``(B, S, C)`` tokens. pos: ``(B, S, C)`` position (+ level) embedding or None.
            reference_points: ``(B, S, L, 2)`` normalised ``(x, y)`` (see ``DeformableEncoder.get_reference_points``).
            spatial_shapes: ``(L, 2)`` int64. level_start_index: ``(L,)`` int64.
            padding_mask: ``(B, S)`` bool, True at padded tokens, or None.

        Returns:
            ``(B, S, C)``.
        """
        query = src if pos is None else src + pos
        src2 = self.self_attn(query, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        return post_norm_ffn(
            src, self.linear1, self.activation, self.dropout2, self.linear2, self.dropout3, self.norm2
        )


class DeformableEncoder(nn.Module):
    """A stack of ``num_layers`` independent copies of ``DeformableEncoderLayer`` (in ``layers``), no final norm.

    The layer arguments come first (same order as ``DeformableEncoderLayer``), then ``num_layers``.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        num_layers: int = 6,
    ):
        super().__init__()
        self.num_layers = num_layers
        layer = DeformableEncoderLayer(d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points)
        self.layers = clone_modules(layer, num_layers)

    @staticmethod
    def get_reference_points(
        spatial_shapes: Tensor | Sequence[Sequence[int]],
        valid_ratios: Tensor,
        device: torch.device | None = None,
    ) -> Tensor:
        """Reference point of every token in every level (Deformable DETR).

        A token at (row ``i``, column ``j``) of level ``l`` sits at the pixel centre ``((j + 0.5) / (r_w^l W_l),
        (i + 0.5) / (r_h^l H_l))`` relative to its level's valid region; it is then mapped into every level ``k``
        by multiplying with that level's valid ratios ``(r_w^k, r_h^k)``.

        Args:
            spatial_shapes: ``(L, 2)`` ``(H, W)`` per level.
            valid_ratios: ``(B, L, 2)`` ``(w_ratio, h_ratio)`` per level (1 without padding).
            device: where to create the points (defaults to ``valid_ratios.device``).

        Returns:
            ``(B, S, L, 2)`` normalised ``(x, y)``.
        """
        device = valid_ratios.device if device is None else device
        valid_ratios = valid_ratios.to(device)
        points = []
        for lvl, (h, w) in enumerate(shapes_as_list(spatial_shapes)):
            # pixel centres i + 0.5 (bit-identical to linspace(0.5, h - 0.5, h), whose step is exactly 1, and free of
            # the float end point that would specialise a symbolic size under torch.export)
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=valid_ratios.dtype, device=device) + 0.5,
                torch.arange(w, dtype=valid_ratios.dtype, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(points, 1)  # (B, S, 2)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        pos: Tensor | None = None,
        padding_mask: Tensor | None = None,
        spatial_shapes_list: Sequence[tuple[int, int]] | None = None,
    ) -> Tensor:
        """
        Args:
            src: ``(B, S, C)`` flattened multi-level features. spatial_shapes: ``(L, 2)`` int64.
            level_start_index: ``(L,)`` int64. valid_ratios: ``(B, L, 2)``.
            pos: ``(B, S, C)`` or None. padding_mask: ``(B, S)`` bool True=pad, or None.
            spatial_shapes_list: the same ``(H, W)`` per level as Python ints, or None. When given, the reference
                points are built from it instead of reading ``spatial_shapes`` back with ``.tolist()``: under
                ``torch.export`` that read is data-dependent and fails, while Python ints are static.

        Returns:
            ``(B, S, C)`` memory.
        """
        shapes = spatial_shapes if spatial_shapes_list is None else spatial_shapes_list
        reference_points = self.get_reference_points(shapes, valid_ratios, device=src.device)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output
